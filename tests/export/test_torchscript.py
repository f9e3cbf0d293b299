"""TorchScript: torch.jit.script of every layer and of MONAI networks built with norm="adaptive" computes
what eager computes (fallbacks, running statistics, the eval rule) and survives jit.save / jit.load;
torch.jit.trace records the native kernels in both layouts."""
import copy
import io
import warnings

import pytest
import torch
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet, resnet18
from torch import nn

import adanorm

pytestmark = pytest.mark.filterwarnings("ignore::adanorm.FallbackWarning")

LAYERS = {3: adanorm.AdaptiveNorm1d, 4: adanorm.AdaptiveNorm2d, 5: adanorm.AdaptiveNorm3d}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# Shapes that walk the fallback chain: batch statistics (32 samples), then per-sample statistics: group,
# instance (in the chain that tries it first, OLD_CHAIN), layer and identity.
SHAPES = {3: [(32, 6, 5), (2, 6, 5), (2, 6, 1), (1, 6, 1)], 4: [(32, 6, 3, 3), (1, 6, 1, 2), (2, 6, 1, 1)],
          5: [(32, 6, 2, 2, 2), (2, 6, 2, 2, 2), (1, 6, 1, 1, 1), (3, 6, 1, 1, 2)]}
OLD_CHAIN = adanorm.Policy(chain=adanorm.MODES)  # batch, instance, group, layer, identity


def round_trip(scripted):
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def randomized(layer):
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    return layer


def assert_same_state(eager, scripted):
    scripted_state = scripted.state_dict()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(scripted_state[key], value, msg=key)


@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("mode, preset, policy", [
    ("auto", None, None), ("auto", None, OLD_CHAIN), ("auto", "cumulative", None), ("auto", "auto", None),
    ("batch", "tiny_batch", None), ("instance", None, None), ("group", None, None), ("layer", None, None),
    ("identity", None, None)])
def test_scripted_layer_equals_eager_through_training_and_eval(rank, mode, preset, policy):
    eager = randomized(LAYERS[rank](6, mode=mode, preset=preset, num_groups=3, policy=policy))
    scripted = round_trip(torch.jit.script(copy.deepcopy(eager)))
    shapes = SHAPES[rank] if mode == "auto" else [s for s in SHAPES[rank] if adanorm.policy.mode_is_usable(mode, s, 3, None)]
    for training in (True, False):
        eager.train(training), scripted.train(training)
        for shape in shapes:
            x = torch.randn(shape) * 2 + 1
            torch.testing.assert_close(scripted(x), eager(x))
        assert_same_state(eager, scripted)


def test_scripted_forced_mode_raises_where_eager_does():
    scripted = torch.jit.script(adanorm.AdaptiveNorm3d(4, mode="instance"))
    with pytest.raises(torch.jit.Error, match="cannot normalize input of shape"):
        scripted(torch.randn(2, 4, 1, 1, 1))


def test_scripted_strict_layer_without_group_mode_starts_its_chain_at_instance_mode():
    """As eager: one group (prime C) means no group mode, so instance statistics are its first choice in eval."""
    eager = adanorm.AdaptiveNorm3d(5, policy=adanorm.Policy(strict=True)).eval()
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = torch.randn(2, 5, 4, 4, 4)
    torch.testing.assert_close(scripted(x), eager(x))
    assert eager.last_mode == "instance"
    with pytest.raises(torch.jit.Error, match="fell back to layer"):
        scripted(torch.randn(2, 5, 1, 1, 1))


def test_scripted_strict_layer_raises_only_where_eager_falls_back():
    """Group statistics below min_batch_size are the design, in scripted code as in eager; a 1×1×1 patch (two
    values per group) is a fallback, which a strict policy refuses in both."""
    eager = adanorm.AdaptiveNorm3d(4, policy=adanorm.Policy(strict=True))
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = torch.randn(2, 4, 2, 2, 2)
    torch.testing.assert_close(scripted(x), eager(x))
    assert eager.last_mode == "group"
    with pytest.raises(adanorm.FallbackError, match="fell back to 'layer' mode from 'group'"):
        eager(torch.randn(2, 4, 1, 1, 1))
    with pytest.raises(torch.jit.Error, match="fell back to layer"):
        scripted(torch.randn(2, 4, 1, 1, 1))


def test_scripted_layer_follows_the_eval_rule_after_loading_a_checkpoint():
    native = nn.BatchNorm3d(5)
    native(torch.randn(8, 5, 3, 3, 3) * 2 + 3)
    scripted = torch.jit.script(adanorm.AdaptiveNorm3d(5))
    scripted.load_state_dict(native.state_dict())
    scripted.eval(), native.eval()
    x = torch.randn(1, 5, 1, 1, 1)
    torch.testing.assert_close(scripted(x), native(x))


NETWORKS = {
    "UNet": lambda: UNet(3, 1, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), norm="adaptive"),
    "BasicUNet": lambda: BasicUNet(3, 1, 2, features=(8, 8, 16, 16, 32, 8), norm="adaptive"),
    "DynUNet": lambda: DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], norm_name="adaptive"),
    "SegResNet": lambda: SegResNet(3, init_filters=8, in_channels=1, out_channels=2, norm="adaptive"),
    "converted resnet18": lambda: adanorm.convert(resnet18(spatial_dims=3, n_input_channels=1, num_classes=2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_scripted_monai_networks_equal_eager(name, monkeypatch):
    from adanorm.functional import dispatch

    monkeypatch.setattr(dispatch, "cpu_kernels", lambda: None)  # scripted networks run native kernels: compare like with like
    torch.manual_seed(0)
    eager = NETWORKS[name]()
    scripted = round_trip(torch.jit.script(copy.deepcopy(eager)))
    for training, batch in ((True, 2), (True, 32), (False, 1)):  # per-sample statistics, batch statistics, eval
        eager.train(training), scripted.train(training)
        x = torch.randn(batch, 1, 16, 16, 16)
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-4, atol=1e-5)
    assert_same_state(eager, scripted)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("learned", [False, True])
def test_traced_model_saves_loads_and_matches(channels_last, learned):
    model = nn.Sequential(nn.Conv3d(2, 16, 3, padding=1), adanorm.AdaptiveNorm3d(16), nn.ReLU())
    if learned:
        model(torch.randn(32, 2, 4, 4, 4) * 2 + 1)  # batch mode: learned running statistics
        assert model[1].has_learned_running_stats()
    model.eval()
    x = torch.randn(2, 2, 6, 6, 6)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the mode is chosen per shape: a trace fixes it
        traced = torch.jit.trace(model, x)
    loaded = round_trip(traced)
    other = torch.randn(2, 2, 6, 6, 6) * 3 - 1
    if channels_last:
        other = other.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(loaded(other), model(other))
    assert "PythonOp" not in str(traced.graph)


def test_the_eager_model_keeps_running_its_own_layers_after_scripting():
    """torch.jit.script rewrites the module tree it is given in place; the eager forward still runs the layer."""
    model = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), adanorm.AdaptiveNorm3d(8))
    layer = model[1]
    scripted = torch.jit.script(model)
    x = torch.randn(32, 2, 4, 4, 4)
    torch.testing.assert_close(model(x), scripted(x))
    assert layer.mode_counts["batch"] == 1 and layer.last_mode == "batch"  # the eager layer ran, with its telemetry
