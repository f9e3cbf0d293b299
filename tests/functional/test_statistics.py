"""Running statistics users can trust (#14): the eval rule reads the buffers, EMA/SWA copies and
recalibration evaluate like nn.BatchNorm3d, conversion keeps every native configuration's behaviour,
non-finite batches do not poison the buffers, and eval mirrors how the layer trained."""
import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import adanorm
from adanorm import NonFiniteStatsWarning, Policy

pytestmark = pytest.mark.filterwarnings("ignore::adanorm.FallbackWarning")


def conv_net(norm_cls, channels=6):
    return nn.Sequential(nn.Conv3d(2, channels, 3, padding=1), norm_cls(channels), nn.ReLU(),
                         nn.Conv3d(channels, channels, 3, stride=2, padding=1), norm_cls(channels))


def native_twin(adaptive_model):
    """nn.BatchNorm3d in place of every adaptive layer, loaded strictly with the same state."""
    native = conv_net(nn.BatchNorm3d, adaptive_model[0].out_channels)
    native.load_state_dict(adaptive_model.state_dict(), strict=True)
    return native.eval()


def assert_evaluates_like_batchnorm(adaptive_model, shapes=((1, 2, 4, 4, 4), (3, 2, 2, 2, 2), (1, 2, 1, 1, 1))):
    adaptive_model.eval()
    native = native_twin(adaptive_model)
    for shape in shapes:
        x = torch.randn(shape)
        torch.testing.assert_close(adaptive_model(x), native(x))
    assert {m.last_mode for m in adaptive_model.modules() if isinstance(m, adanorm.AdaptiveNorm)} == {"batch"}


def train_steps(model, batch_size, steps=4, scale=3.0, shift=2.0):
    model.train()
    for _ in range(steps):
        model(torch.randn(batch_size, 2, 4, 4, 4) * scale + shift)


# --- 1. in-place copies of the running statistics count -------------------------------------------

def test_buffer_copy_into_a_fresh_layer_is_used_in_eval():
    """The issue's reproducer: an EMA-style copy_ of every buffer used to leave the copy in instance mode."""
    m = adanorm.AdaptiveNorm3d(4)
    ema = copy.deepcopy(m)
    m(torch.randn(32, 4, 4, 4, 4) * 3 + 2)
    with torch.no_grad():
        for be, b in zip(ema.buffers(), m.buffers()):
            be.copy_(b)
    m.eval(), ema.eval()
    x = torch.randn(1, 4, 4, 4, 4)
    torch.testing.assert_close(ema(x), m(x))
    assert ema.last_mode == "batch"


def test_copying_only_the_state_dict_buffers_counts_too():
    """timm-style EMA copies state_dict() values, which do not include adanorm's non-persistent buffers."""
    model, ema = conv_net(adanorm.AdaptiveNorm3d), conv_net(adanorm.AdaptiveNorm3d)
    train_steps(model, 32)
    with torch.no_grad():
        for target, source in zip(ema.state_dict().values(), model.state_dict().values()):
            target.copy_(source)
    assert_evaluates_like_batchnorm(ema)


def test_dtype_and_device_moves_keep_the_rule():
    model = conv_net(adanorm.AdaptiveNorm3d)
    train_steps(model, 32)
    model = model.double().float()  # new buffer tensors: the version-counter cache must not go stale
    assert_evaluates_like_batchnorm(model)


def test_averaged_model_with_buffers_evaluates_like_batchnorm():
    model = conv_net(adanorm.AdaptiveNorm3d)
    for multi_avg_fn in (None, get_ema_multi_avg_fn(0.9)):
        averaged = AveragedModel(model, use_buffers=True, multi_avg_fn=multi_avg_fn)
        for _ in range(3):
            train_steps(model, 32, steps=1)
            averaged.update_parameters(model)
        assert_evaluates_like_batchnorm(averaged.module)


def test_load_state_dict_of_an_old_checkpoint_with_a_zero_counter_counts_by_value():
    native = nn.BatchNorm3d(4)
    native(torch.randn(8, 4, 3, 3, 3) * 2 + 1)
    state = native.state_dict()
    state["num_batches_tracked"].zero_()
    layer = adanorm.AdaptiveNorm3d(4)
    layer.load_state_dict(state)
    layer.eval(), native.eval()
    x = torch.randn(1, 4, 1, 1, 1)
    torch.testing.assert_close(layer(x), native(x))


# --- 2. recalibration ------------------------------------------------------------------------------

def reference_statistics(native_model, batches):
    """Exact mean / unbiased variance of every BatchNorm input, each batch normalized with batch statistics."""
    captured = {m: [] for m in native_model.modules() if isinstance(m, nn.BatchNorm3d)}
    hooks = [m.register_forward_pre_hook(lambda m, inputs: captured[m].append(inputs[0].detach().double())) for m in captured]
    native_model.train()
    with torch.no_grad():
        for x in batches:
            native_model(x)
    for hook in hooks:
        hook.remove()
    stats = []
    for values in captured.values():
        flat = torch.cat([v.transpose(0, 1).reshape(v.shape[1], -1) for v in values], dim=1)
        var, mean = torch.var_mean(flat, dim=1, unbiased=True)
        stats.append((mean, var))
    return stats


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_update_bn_gives_exact_population_statistics_and_evaluates_like_batchnorm(batch_size):
    model = conv_net(adanorm.AdaptiveNorm3d)
    train_steps(model, 2)  # group mode at batch 2: running statistics untouched, eval per-sample
    batches = [torch.randn(batch_size, 2, 4, 4, 4) * 3 + 2 for _ in range(5)]
    expected = reference_statistics(native_twin(model), batches)
    adanorm.update_bn(batches, model)
    layers = [m for m in model.modules() if isinstance(m, adanorm.AdaptiveNorm)]
    for layer, (mean, var) in zip(layers, expected):
        torch.testing.assert_close(layer.running_mean, mean.float())
        torch.testing.assert_close(layer.running_var, var.float())
        assert int(layer.num_batches_tracked) == len(batches)
    assert model.training  # the flag is restored
    assert_evaluates_like_batchnorm(model)


def test_update_bn_takes_torch_call_and_recalibrates_native_layers_too():
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 1), adanorm.AdaptiveNorm3d(4))
    twin = copy.deepcopy(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 2, 3, 3, 3) * 2 + 1), batch_size=4)
    adanorm.update_bn(loader, model, device="cpu")
    torch.optim.swa_utils.update_bn(loader, twin)  # torch: cumulative average of per-batch statistics
    # Equal batch sizes: the means agree with torch's; torch leaves the adaptive layer at 0/1.
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
    assert twin[4].running_mean.abs().sum() == 0 and model[4].running_mean.abs().sum() > 0


def test_update_bn_with_dict_batches_needs_forward_fn():
    model = conv_net(adanorm.AdaptiveNorm3d)
    batches = [{"image": torch.randn(2, 2, 4, 4, 4)} for _ in range(3)]
    with pytest.raises(TypeError, match=r"forward_fn=lambda model, batch: model\(batch\['image'\]\)"):
        adanorm.update_bn(batches, model)
    adanorm.update_bn(batches, model, forward_fn=lambda net, batch: net(batch["image"]), num_batches=2)
    assert int(model[1].num_batches_tracked) == 2


# --- 3, 4. conversion keeps every native configuration ---------------------------------------------

def native_layers():
    for affine, track, momentum in itertools.product([True, False], [True, False], [0.1, None]):
        for cls in (nn.BatchNorm3d, nn.InstanceNorm3d, nn.SyncBatchNorm):
            yield cls(6, affine=affine, track_running_stats=track, momentum=momentum)
    for affine in (True, False):
        yield nn.GroupNorm(3, 6, affine=affine)


def randomized(native):
    with torch.no_grad():
        if getattr(native, "weight", None) is not None:
            native.weight.uniform_(0.5, 1.5), native.bias.uniform_(-1, 1)
        if getattr(native, "running_mean", None) is not None:
            native.running_mean.uniform_(-1, 1), native.running_var.uniform_(0.5, 2)
    return native


@pytest.mark.parametrize("native", list(native_layers()), ids=repr)
def test_convert_keeps_behaviour_and_revert_is_its_inverse(native):
    native = randomized(native)
    for training, batch in itertools.product([False, True], [2, 4]):
        if training and isinstance(native, nn.SyncBatchNorm):
            continue  # SyncBatchNorm trains only under torch.distributed
        reference = copy.deepcopy(native).train(training)
        adaptive = adanorm.convert(copy.deepcopy(native)).train(training)
        for _ in range(2):
            x = torch.randn(batch, 6, 3, 3, 3) * 2 + 1
            torch.testing.assert_close(adaptive(x), reference(x))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(reference, name, None) is not None:
                torch.testing.assert_close(getattr(adaptive, name), getattr(reference, name))
        assert set(adaptive.state_dict()) == set(reference.state_dict())
    back = adanorm.revert(adanorm.convert(copy.deepcopy(native)))
    assert type(back) is type(native) and repr(back) == repr(native)
    for key, value in native.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


def test_convert_accepts_eps_zero():
    native = randomized(nn.BatchNorm3d(4, eps=0)).eval()
    adaptive = adanorm.convert(copy.deepcopy(native))
    x = torch.randn(2, 4, 2, 2, 2)
    torch.testing.assert_close(adaptive(x), native(x))


# --- 5. non-finite batches -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_batch_skips_the_update_and_is_counted(bad):
    layer, native = adanorm.AdaptiveNorm3d(4), nn.BatchNorm3d(4)
    good = torch.randn(32, 4, 3, 3, 3)  # batch mode, which updates the running statistics
    layer(good), native(good)
    before = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(32, 4, 3, 3, 3)
    x[0, 1, 0, 0, 0] = bad
    with pytest.warns(NonFiniteStatsWarning, match="skipped"):
        output = layer(x)
    torch.testing.assert_close(output, native(x), equal_nan=True)  # outputs follow IEEE as natively
    torch.testing.assert_close((layer.running_mean, layer.running_var), before)
    assert int(layer.nonfinite_skips) == 1 and not torch.isfinite(native.running_mean).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteStatsWarning)  # warned once per layer
        layer(x)
    assert int(layer.nonfinite_skips) == 2
    layer(good)
    assert torch.isfinite(layer.running_mean).all() and not torch.equal(layer.running_mean, before[0])


def test_the_guard_can_be_turned_off():
    layer = adanorm.AdaptiveNorm3d(4, policy=Policy(skip_nonfinite=False))
    native = nn.BatchNorm3d(4)
    x = torch.randn(32, 4, 3, 3, 3)
    x[0, 1, 0, 0, 0] = float("nan")
    layer(x), native(x)
    assert layer.last_mode == "batch"
    torch.testing.assert_close((layer.running_mean, layer.running_var), (native.running_mean, native.running_var), equal_nan=True)
    assert layer.nonfinite_skips == 0


# --- 8. eval mirrors training ----------------------------------------------------------------------

def checkpoint_net():
    """A BatchNorm network with learned statistics, as a checkpoint would hold."""
    native = conv_net(nn.BatchNorm3d)
    train_steps(native, 8, steps=5)
    return native


def test_fine_tuning_a_converted_checkpoint_at_batch_2_keeps_its_statistics_current():
    model = adanorm.convert(checkpoint_net())
    loaded = [m.running_mean.clone() for m in model.modules() if isinstance(m, adanorm.AdaptiveNorm)]
    train_steps(model, 2, scale=5.0, shift=-1.0)  # a shifted domain: the statistics must follow
    layers = [m for m in model.modules() if isinstance(m, adanorm.AdaptiveNorm)]
    assert all(m.last_mode == "batch" for m in layers)
    assert all(not torch.equal(m.running_mean, old) for m, old in zip(layers, loaded))
    assert_evaluates_like_batchnorm(model)


@pytest.mark.parametrize("make, batch, mode", [
    # converted with a policy that trains batch 1 per-sample (plain convert keeps batch mode there, as native)
    (lambda net: adanorm.convert(net, policy=adanorm.Policy(chain=adanorm.MODES, min_batch_size=2)), 1, "instance"),
    (lambda net: nn.Sequential(*[adanorm.AdaptiveNorm3d(m.num_features) if isinstance(m, nn.BatchNorm3d) else m for m in net]), 2,
     "group"),  # the default chain: group before instance
], ids=["converted_batch1", "default_policy_batch2"])
def test_eval_never_uses_statistics_training_left_behind(make, batch, mode):
    native = checkpoint_net()
    model = make(copy.deepcopy(native))
    model.load_state_dict(native.state_dict(), strict=True)
    train_steps(model, batch)
    layers = [m for m in model.modules() if isinstance(m, adanorm.AdaptiveNorm)]
    assert all(m.last_mode == mode for m in layers)
    for layer, old in zip(layers, [m for m in native.modules() if isinstance(m, nn.BatchNorm3d)]):
        torch.testing.assert_close(layer.running_mean, old.running_mean)  # kept, not lost
    model.eval()
    x = torch.randn(1, 2, 4, 4, 4)
    hidden = model[2](model[1](model[0](x)))
    if mode == "instance":
        expected = F.instance_norm(model[0](x), weight=model[1].weight, bias=model[1].bias)
    else:  # 6 channels: 3 groups of 2
        expected = F.group_norm(model[0](x), 3, weight=model[1].weight, bias=model[1].bias)
    torch.testing.assert_close(model[1](model[0](x)), expected)
    torch.testing.assert_close(model(x), model[4](model[3](hidden)))
    assert all(m.last_mode == mode for m in layers)
    # A load makes the loaded statistics current again.
    model.load_state_dict(native.state_dict())
    assert_evaluates_like_batchnorm(model)


def test_a_smaller_last_batch_per_epoch_keeps_eval_on_running_statistics():
    model = conv_net(adanorm.AdaptiveNorm3d)
    for _epoch in range(3):
        train_steps(model, 32, steps=6)
        train_steps(model, 3, steps=1)  # the remainder batch of each epoch
        assert_evaluates_like_batchnorm(model)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_balance_equals_its_update_every_step_although_writes_stop_at_the_fixed_point(dtype):
    """The balance skips its update once the update would leave it unchanged (a small layer's call
    saves the write); it must still equal, bit for bit, the plain ``lerp_`` sequence through long runs
    in one direction, direction changes and writes from outside (a load, a copy, a reset)."""
    layer = adanorm.AdaptiveNorm3d(4).to(dtype)
    reference = torch.zeros((), dtype=dtype)
    small, large = torch.randn(1, 4, 2, 2, 2, dtype=dtype), torch.randn(32, 4, 2, 2, 2, dtype=dtype)

    def steps(batch, count):
        for _ in range(count):
            layer(batch)
            reference.lerp_(torch.tensor(1.0 if batch is large else -1.0, dtype=dtype), 1 - adanorm.norm.BALANCE_DECAY)
            assert torch.equal(layer.running_stats_balance, reference), (dtype, batch.shape[0])

    layer.train()
    steps(small, 600)  # well past convergence in every dtype
    version = layer.running_stats_balance._version
    steps(small, 3 * adanorm.norm.BALANCE_CHECK_STEPS)
    assert layer.running_stats_balance._version == version, "at the fixed point the update must not write"
    steps(large, 5)  # a change of direction moves it again
    steps(large, 700)
    steps(small, 2)
    layer.running_stats_balance.fill_(0.25)  # a write from outside (copy_, AveragedModel) restarts the count
    reference.fill_(0.25)
    steps(small, 130)
    layer.load_state_dict(layer.state_dict())  # a load zeroes it
    reference.zero_()
    steps(large, 70)
    layer_copy = copy.deepcopy(layer)  # a copy's buffer is another tensor: its count starts over
    layer, copied_reference = layer_copy, reference.clone()
    reference = copied_reference
    steps(small, 300)


@pytest.mark.slow
def test_functional_call_and_vmap_update_the_buffers_they_are_given():
    """torch.func users (functional training, vmap ensembles) pass their own buffers: every update,
    balance included, lands in those, bit-equal to a module trained eagerly, and none in the module."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    layer, eager = adanorm.AdaptiveNorm3d(8).train(), adanorm.AdaptiveNorm3d(8).train()
    x = torch.randn(2, 8, 4, 4, 4)
    buffers = {name: value.clone() for name, value in layer.named_buffers()}
    untouched = {name: value.clone() for name, value in layer.named_buffers()}
    for _ in range(2 * adanorm.norm.BALANCE_CHECK_STEPS + 5):  # through two fixed-point checks
        torch.testing.assert_close(functional_call(layer, (dict(layer.named_parameters()), buffers), (x,)), eager(x))
    for name, value in eager.named_buffers():
        assert torch.equal(buffers[name], value), name
        assert torch.equal(dict(layer.named_buffers())[name], untouched[name]), name

    members, eager = [adanorm.AdaptiveNorm3d(8).train() for _ in range(3)], adanorm.AdaptiveNorm3d(8).train()
    parameters, stacked = stack_module_state(members)
    template = copy.deepcopy(members[0]).to("meta")
    for _ in range(adanorm.norm.BALANCE_CHECK_STEPS + 3):
        outputs = vmap(lambda p, b: functional_call(template, (p, b), (x,)), in_dims=(0, 0))(parameters, stacked)
        expected = eager(x)
    for member in range(3):
        torch.testing.assert_close(outputs[member], expected)
    assert torch.equal(stacked["running_stats_balance"], eager.running_stats_balance.expand(3))

# --- recalibration in a Lightning run -----------------------------------------------------------------

def test_recalibrate_norms_callback_gives_validation_population_statistics(tmp_path):
    import lightning.pytorch as pl

    from adanorm.integrations.lightning import RecalibrateNorms

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = conv_net(adanorm.AdaptiveNorm3d)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return self(batch["image"]).square().mean()

        def validation_step(self, batch, batch_idx):
            self.modes = {m.last_mode for m in self.net.modules() if isinstance(m, adanorm.AdaptiveNorm)}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    images = [{"image": torch.randn(2, 4, 4, 4) * 3 + 2} for _ in range(6)]
    loader = torch.utils.data.DataLoader(images, batch_size=2)  # batch 2: the layers train per-sample
    module = Tiny()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[RecalibrateNorms(num_batches=3)])
    trainer.fit(module, loader, loader)
    assert module.modes == {"batch"}  # validation ran on the recalibrated running statistics
    assert all(int(m.num_batches_tracked) == 3 for m in module.net.modules() if isinstance(m, adanorm.AdaptiveNorm))
    assert_evaluates_like_batchnorm(module.net)


def test_eval_statistics_says_what_eval_normalizes_with():
    """The eval rule's public answer agrees with what an eval forward computes: equal to the native
    module run on the running statistics, or to the per-sample mode it names."""
    x = torch.randn(2, 8, 4, 4, 4)
    fresh = adanorm.AdaptiveNorm3d(8).eval()
    assert fresh.eval_statistics(x.shape) == "group" and not fresh.eval_uses_running_stats()
    torch.testing.assert_close(fresh(x), F.group_norm(x, 4), rtol=1e-5, atol=1e-5)  # 8 channels: 4 groups of 2
    instance_first = adanorm.AdaptiveNorm3d(8, policy="instance_first").eval()
    assert instance_first.eval_statistics(x.shape) == "instance"
    torch.testing.assert_close(instance_first(x), F.instance_norm(x), rtol=1e-5, atol=1e-5)
    assert fresh.eval_statistics((2, 8, 1, 1, 1)) == "layer"  # groups of 2 channels: 2 values, below min_group_size
    trained = adanorm.AdaptiveNorm3d(8, mode="auto")
    trained.train()
    for _ in range(3):
        trained(torch.randn(32, 8, 4, 4, 4) * 2 + 1)
    trained.eval()
    assert trained.eval_statistics(x.shape) == "running" and trained.eval_uses_running_stats()
    torch.testing.assert_close(trained(x), F.batch_norm(x, trained.running_mean, trained.running_var, trained.weight,
                                                        trained.bias, False, 0.0, trained.eps))
    forced = adanorm.AdaptiveNorm3d(8, mode="instance").eval()
    assert forced.eval_statistics(x.shape) == "instance" and not forced.eval_uses_running_stats()
    assert adanorm.AdaptiveNorm3d(8, mode="batch").eval().eval_statistics(x.shape) == "running"
