"""torch.compile(fullgraph=True): outputs, gradients and running statistics equal eager, in training
and eval, for every mode, preset and layout, after load_state_dict, and for the README's MONAI UNet;
a layer compiles once per shape and once per fallback regime."""
import copy

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn
from torch._dynamo.testing import CompileCounter

import adanorm

# Each case compiles a graph (seconds to tens of seconds on 2 cores): part of the full suite, not the inner loop.
pytestmark = [pytest.mark.filterwarnings("ignore::adanorm.FallbackWarning"), pytest.mark.slow]
BACKEND = "aot_eager"  # dynamo + AOTAutograd (forward and backward graphs) without inductor's C++ build time


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def block(mode="auto", preset=None, channels=8):
    return nn.Sequential(nn.Conv3d(2, channels, 3, padding=1), adanorm.AdaptiveNorm3d(channels, mode=mode, preset=preset), nn.ReLU())


def step(model, x):
    model.zero_grad()
    y = model(x)
    if model.training:
        y.square().mean().backward()
    return y


def assert_compiled_equals_eager(eager, batches, channels_last=False, backend=BACKEND):
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    if channels_last:
        eager, compiled_model = eager.to(memory_format=torch.channels_last_3d), compiled_model.to(memory_format=torch.channels_last_3d)
    for training in (True, False):
        eager.train(training), compiled_model.train(training)
        for x in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            torch.testing.assert_close(step(compiled, x), step(eager, x), rtol=1e-4, atol=1e-5)
            for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
                if a.grad is not None:
                    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
            for (name, a), b in zip(eager.named_buffers(), compiled_model.buffers()):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# Auto mode: batch statistics at 32 samples, group statistics at 2 (Policy's default min_batch_size is 32).
BATCHES = [torch.randn(32, 2, 4, 4, 4) * 2 + 1, torch.randn(2, 2, 4, 4, 4) - 1, torch.randn(32, 2, 4, 4, 4) * 3]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("mode", ["auto", *adanorm.MODES])
def test_every_mode_compiles_fullgraph_and_equals_eager(mode, channels_last):
    assert_compiled_equals_eager(block(mode), BATCHES, channels_last)


@pytest.mark.parametrize("preset", list(adanorm.PRESETS))
def test_every_preset_compiles_fullgraph_and_equals_eager(preset):
    assert_compiled_equals_eager(block("batch", preset), BATCHES)


def test_compiles_after_loading_a_batchnorm_checkpoint():
    native = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
    native(torch.randn(8, 2, 4, 4, 4) * 2 + 3)
    model = block()
    model.load_state_dict(native.state_dict())
    assert_compiled_equals_eager(model, [torch.randn(1, 2, 4, 4, 4), torch.randn(2, 2, 1, 1, 1)])


def test_readme_unet_compiles_fullgraph_and_equals_eager():
    torch.manual_seed(0)
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), norm="adaptive")
    assert_compiled_equals_eager(unet, [torch.randn(2, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16)])


def test_inductor_compiles_a_block_and_equals_eager():
    assert_compiled_equals_eager(block(), BATCHES[:2], backend="inductor")


def compile_count(module, batch_sizes):
    counter = CompileCounter()
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    for batch in batch_sizes:
        compiled(torch.randn(batch, 8, 4, 4, 4))
    return counter.frame_count


@pytest.mark.parametrize("training", [True, False])
def test_ten_calls_at_one_shape_compile_once(training):
    assert compile_count(adanorm.AdaptiveNorm3d(8, mode="instance").train(training), [2] * 10) == 1
    assert compile_count(adanorm.AdaptiveNorm3d(8).train(training), [32] * 10) == 1


def test_one_graph_per_fallback_regime():
    """Batch sizes 1 → 2 → 32 → 1. Dynamo itself compiles batch 1 apart from other sizes (it specializes
    sizes 0 and 1), as for native norms; beyond that, one graph per regime the layer visits."""
    sizes = [1, 2, 32, 1]
    native = compile_count(nn.BatchNorm3d(8), sizes)
    assert compile_count(adanorm.AdaptiveNorm3d(8, mode="instance"), sizes) == native  # one regime
    assert compile_count(adanorm.AdaptiveNorm3d(8), sizes) == native + 1  # group at 1-2, batch at 32
    assert compile_count(adanorm.AdaptiveNorm3d(8).eval(), sizes) == native  # eval never depends on N
