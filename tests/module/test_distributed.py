"""Synchronized batch mode on 2 CPU processes (gloo): equal to one process on the concatenated batch,
uneven and empty local batches, one mode decision on every rank, identical eval on every rank.

Each test spawns two processes and fails (instead of hanging) if they do not finish in time.
"""
import io
import multiprocessing
import os
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import adanorm

pytestmark = pytest.mark.slow  # every case starts a process group of two workers: tens of seconds on 2 cores

WORLD = 2
TIMEOUT_S = 90


def _worker(rank, init_file, function, args, results):
    try:
        torch.set_num_threads(1)
        warnings.simplefilter("ignore", adanorm.FallbackWarning)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=TIMEOUT_S // 2))
        outcome = _detached(function(rank, *args))
        dist.destroy_process_group()
    except BaseException:  # report the failure to the parent instead of leaving it waiting
        outcome = RuntimeError(traceback.format_exc())
    # Serialized by value: a tensor put on a queue as is lives in this process's shared memory, gone once it exits.
    buffer = io.BytesIO()
    torch.save(outcome if not isinstance(outcome, Exception) else str(outcome), buffer)
    results.put((rank, isinstance(outcome, Exception), buffer.getvalue()))
    results.close()
    results.join_thread()


def _detached(value):
    """Tensors cross the process boundary without their autograd graph."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(item) for item in value)
    return value


def run_on_two_ranks(tmp_path, function, *args):
    """``function(rank, *args)`` on two gloo ranks; returns the results by rank, failing on a hang."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    init_file = tmp_path / f"init-{function.__name__}"
    processes = [context.Process(target=_worker, args=(rank, str(init_file), function, args, results)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    collected = {}
    try:
        for _ in range(WORLD):
            rank, failed, payload = results.get(timeout=TIMEOUT_S)
            result = torch.load(io.BytesIO(payload), weights_only=True)
            if failed:
                raise RuntimeError(f"rank {rank} failed:\n{result}")
            collected[rank] = result
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return collected


def full_batch(sizes, channels=6, spatial=(3, 3, 3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((sum(sizes), channels) + spatial, generator=generator, dtype=torch.float64) * 2 + 1
    upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x, upstream


def make_layer(channels=6, **kwargs):
    layer = adanorm.AdaptiveNorm3d(channels, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, channels)), layer.bias.copy_(torch.linspace(-1, 1, channels))
    return layer


def local_slice(tensor, sizes, rank):
    start = sum(sizes[:rank])
    return tensor[start:start + sizes[rank]]


def synced_steps(rank, sizes, steps):
    """Every rank trains a synced batch-mode layer on its slice of the same batches."""
    layer = make_layer(mode="batch", sync=True)
    outputs = []
    for step in range(steps):
        x, upstream = full_batch(sizes, seed=step)
        x = local_slice(x, sizes, rank).clone().requires_grad_()
        y = layer(x)
        (y * local_slice(upstream, sizes, rank)).sum().backward()
        outputs.append((y.detach(), x.grad))
    return outputs, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var, layer.num_batches_tracked


@pytest.mark.parametrize("sizes", [(2, 2), (1, 3), (0, 4)])
def test_synced_batch_mode_equals_one_process_on_the_concatenated_batch(tmp_path, sizes):
    results = run_on_two_ranks(tmp_path, synced_steps, sizes, 2)
    reference = make_layer(mode="batch")
    for step in range(2):
        x, upstream = full_batch(sizes, seed=step)
        x.requires_grad_()
        y = reference(x)
        (y * upstream).sum().backward()
        torch.testing.assert_close(torch.cat([results[r][0][step][0] for r in range(WORLD)]), y.detach())
        torch.testing.assert_close(torch.cat([results[r][0][step][1] for r in range(WORLD)]), x.grad)
    torch.testing.assert_close(results[0][1] + results[1][1], reference.weight.grad)  # DDP would average these sums
    torch.testing.assert_close(results[0][2] + results[1][2], reference.bias.grad)
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank][3], reference.running_mean)
        torch.testing.assert_close(results[rank][4], reference.running_var)
        assert int(results[rank][5]) == 2


def auto_steps(rank, sizes, spatial, steps):
    """Auto mode, synced; returns each step's mode and the eval output on an input every rank shares."""
    layer = make_layer(sync=True)
    modes = []
    for step in range(steps):
        x, upstream = full_batch(sizes, spatial=spatial, seed=step)
        local_slice(x, sizes, rank).requires_grad_()
        y = layer(local_slice(x, sizes, rank))
        (y * local_slice(upstream, sizes, rank)).sum().backward()
        modes.append(layer.last_mode)
    layer.eval()
    probe = torch.randn((2, 6) + spatial, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    return modes, layer(probe), layer.last_mode


@pytest.mark.parametrize("sizes, spatial, expected", [
    ((24, 9), (2, 2, 2), "batch"),  # 33 samples: batch on both ranks, though neither has min_batch_size=32 alone
    ((1, 2), (1, 1, 1), "layer"),  # 3 samples at 1×1×1
])
def test_auto_mode_decides_once_for_every_rank(tmp_path, sizes, spatial, expected):
    results = run_on_two_ranks(tmp_path, auto_steps, sizes, spatial, 3)
    assert results[0][0] == results[1][0] == [expected] * 3
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert results[0][2] == results[1][2]


def ddp_unsynced_steps(rank, sizes):
    """Plain DDP, no sync: rank 0 trains in batch mode, rank 1 per-sample; DDP broadcasts rank 0's buffers."""
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Conv3d(2, 6, 1).double(), make_layer()))
    for step in range(3):
        x = torch.randn((sizes[rank], 2, 2, 2, 2), generator=torch.Generator().manual_seed(10 * step + rank), dtype=torch.float64)
        model(x).square().mean().backward()
    model.eval()
    probe = torch.randn((1, 2, 2, 2, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return model(probe), model.module[1].last_mode  # DDP broadcasts rank 0's buffers first, as in training


def test_ddp_broadcast_running_statistics_count_on_every_rank(tmp_path):
    results = run_on_two_ranks(tmp_path, ddp_unsynced_steps, (32, 3))  # batch mode needs 32 samples
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert results[0][1] == results[1][1] == "batch"


def test_sync_on_a_single_process_is_unsynced():
    x, upstream = full_batch((4,))
    synced, plain = make_layer(sync=True, mode="batch"), make_layer(mode="batch")
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=0, atol=0)


def test_convert_syncs_converted_sync_batchnorm_and_on_request():
    model = nn.Sequential(nn.SyncBatchNorm(4), nn.BatchNorm3d(4), nn.GroupNorm(2, 4))
    adanorm.convert(model)
    assert [m.sync for m in model] == [True, False, False]
    assert all(m.sync for m in adanorm.convert(nn.Sequential(nn.BatchNorm3d(4)), sync=True))


def test_lightning_ddp_fit_of_the_unet_recipe_with_the_sync_plugin(tmp_path):
    """Lightning's ddp strategy on 2 CPU processes: both ranks end with equal parameters and buffers."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "ddp_fit.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "data"), str(tmp_path)], capture_output=True,
                            text=True, timeout=TIMEOUT_S * 2, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    assert ranks[0]["synced"] and ranks[1]["synced"]
    assert ranks[0]["modes"] == ranks[1]["modes"]
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0, msg=key)
    for left, right in zip(ranks[0]["balance"], ranks[1]["balance"]):
        torch.testing.assert_close(left, right, rtol=0, atol=0)


def synced_update_bn(rank, sizes):
    model = nn.Sequential(nn.Conv3d(6, 6, 1).double(), make_layer(sync=True))
    torch.nn.init.eye_(model[0].weight.view(6, 6)), torch.nn.init.zeros_(model[0].bias)
    batches = [local_slice(full_batch(sizes, seed=step)[0], sizes, rank) for step in range(3)]
    adanorm.update_bn([b for b in batches if len(b)], model)  # a rank may see no data at all
    return model[1].running_mean, model[1].running_var


@pytest.mark.parametrize("sizes", [(2, 2), (0, 4)])
def test_update_bn_pools_synced_layers_over_every_rank(tmp_path, sizes):
    results = run_on_two_ranks(tmp_path, synced_update_bn, sizes)
    everything = torch.cat([full_batch(sizes, seed=step)[0] for step in range(3)])
    var, mean = torch.var_mean(everything.transpose(0, 1).reshape(6, -1), dim=1, unbiased=True)
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank][0], mean)
        torch.testing.assert_close(results[rank][1], var)
