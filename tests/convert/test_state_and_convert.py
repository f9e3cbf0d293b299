"""Checkpoint compatibility with nn.BatchNorm3d, whole-model conversion, presets and SyncBatchNorm."""
import copy
import warnings

import pytest
import torch
from torch import nn

import adanorm
from adanorm import FallbackWarning, get_preset


@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
def test_state_dict_matches_batchnorm(affine, track):
    native = nn.BatchNorm3d(7, affine=affine, track_running_stats=track)
    layer = adanorm.AdaptiveNorm3d(7, affine=affine, track_running_stats=track)
    layer(torch.randn(8, 7, 2, 2, 2))  # telemetry exists but is not saved
    native_state, state = native.state_dict(), layer.state_dict()
    assert list(state) == list(native_state)
    assert all(state[k].shape == native_state[k].shape for k in state)
    assert state._metadata[""]["version"] == native_state._metadata[""]["version"]


def test_checkpoints_load_both_ways_strictly():
    native_model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1), nn.BatchNorm3d(2))
    adaptive_model = nn.Sequential(nn.Conv3d(1, 4, 3), adanorm.AdaptiveNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1), adanorm.AdaptiveNorm3d(2))
    for _ in range(3):
        native_model(torch.randn(8, 1, 5, 5, 5))
    adaptive_model.load_state_dict(native_model.state_dict(), strict=True)
    back = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1), nn.BatchNorm3d(2))
    back.load_state_dict(adaptive_model.state_dict(), strict=True)
    for model in (native_model, adaptive_model, back):
        model.eval()
    x = torch.randn(1, 1, 3, 3, 3)  # 1x1x1 after the first conv: native BatchNorm3d eval still works
    torch.testing.assert_close(adaptive_model(x), native_model(x))
    torch.testing.assert_close(back(x), native_model(x))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv3d(8, 8, 3, stride=2, padding=1), nn.InstanceNorm3d(8, affine=True), nn.ReLU())
        self.down = nn.Sequential(nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(6), nn.BatchNorm1d(6))

    def forward(self, x):
        return self.head(self.down(self.block(self.stem(x))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convert_keeps_outputs_state_and_flags(dtype):
    model = Mixed().to(dtype)
    model(torch.randn(4, 1, 8, 8, 8, dtype=dtype))
    for module in model.modules():
        if isinstance(module, (nn.InstanceNorm3d, nn.GroupNorm)):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 1, 8, 8, 8, dtype=dtype)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adanorm.convert(model)
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, adanorm.AdaptiveNorm)]
    assert kinds == ["AdaptiveNorm3d", "AdaptiveNorm3d", "AdaptiveNorm", "AdaptiveNorm1d"]
    assert not any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and not isinstance(m, adanorm.AdaptiveNorm)
                   for m in model.modules())
    assert not model.training and all(not m.training for m in model.modules())
    assert all(p.dtype == dtype for p in model.parameters())
    torch.testing.assert_close(model(x), expected)
    assert [m.last_mode for m in model.modules() if isinstance(m, adanorm.AdaptiveNorm)] == ["batch", "instance", "group", "batch"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])

    adanorm.revert(model)
    assert [type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))] == [
        nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm, nn.BatchNorm1d
    ]
    torch.testing.assert_close(model(x), expected)


def test_converted_layers_fall_back_only_where_native_fails():
    instance = adanorm.convert(nn.InstanceNorm3d(8, affine=True))
    group = adanorm.convert(nn.GroupNorm(4, 8))
    x_small = torch.randn(2, 8, 1, 1, 2)  # two values per instance: native InstanceNorm3d still runs
    torch.testing.assert_close(instance(x_small), nn.InstanceNorm3d(8, affine=True)(x_small))
    assert instance.last_mode == "instance"
    torch.testing.assert_close(group(x_small[..., :1]), nn.GroupNorm(4, 8)(x_small[..., :1]))
    assert group.last_mode == "group"
    x_point = torch.randn(2, 8, 1, 1, 1)
    with pytest.raises(ValueError):
        nn.InstanceNorm3d(8)(x_point)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        assert torch.isfinite(instance(x_point)).all()
    assert instance.last_mode == "group"


@pytest.mark.parametrize("shape", [(1, 8, 1, 1, 2), (2, 8, 1, 1, 1), (1, 8, 4, 4, 4), (3, 8, 2, 2, 2)])
def test_converted_batchnorm_runs_batch_mode_wherever_native_runs(shape):
    """Native BatchNorm3d trains on N·D·H·W >= 2 values per channel, batch 1 included: so does the converted layer,
    outputs, gradients and running statistics, without a warning."""
    native = nn.BatchNorm3d(8)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5), native.bias.uniform_(-1, 1)
    converted = adanorm.convert(copy.deepcopy(native))
    for _ in range(3):
        x = (torch.randn(shape) * 2 + 1).requires_grad_()
        x_native = x.detach().clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = converted(x)
        assert [str(w.message) for w in caught] == [] and converted.last_mode == "batch"
        expected = native(x_native)
        torch.testing.assert_close(output, expected)
        output.pow(2).sum().backward(), expected.pow(2).sum().backward()
        torch.testing.assert_close(x.grad, x_native.grad)
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(converted, buffer), getattr(native, buffer))


def test_converted_batchnorm_falls_back_with_one_warning_where_native_raises():
    converted = adanorm.convert(nn.BatchNorm3d(8))
    x = torch.randn(1, 8, 1, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm3d(8)(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            converted(x)
    assert len(caught) == 1 and issubclass(caught[0].category, FallbackWarning)
    assert "fell back to 'layer' mode from 'batch'" in str(caught[0].message)  # 4 groups of 2: too few for group mode
    assert converted.last_fallback_from == "batch" and int(converted.num_batches_tracked) == 0


def test_convert_keeps_a_given_policy_for_batchnorm():
    """A policy the user passes replaces the native batch-size rule: ``min_batch_size=4`` trains batch 2 in group mode."""
    converted = adanorm.convert(nn.BatchNorm3d(8), policy=adanorm.Policy(min_batch_size=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # below its min_batch_size: the design
        converted(torch.randn(2, 8, 2, 2, 2))
    assert converted.last_mode == "group" and converted.policy.min_batch_size == 4


def test_convert_keeps_device_and_preset_kwargs():
    model = adanorm.convert(nn.Sequential(nn.BatchNorm3d(4)), preset="small_batch")
    assert model[0].momentum == 0.05 and model[0].momentum_preset.name == "small_batch"


def test_convert_takes_a_policy_by_name():
    """``policy=`` takes what the adaptive constructor takes: a Policy or a NAMED_POLICIES name."""
    for name in ("instance_group_layer", "instance_first"):  # a chain's name, and its earlier alias
        layer = adanorm.convert(nn.BatchNorm3d(4), policy=name)
        assert layer.policy.chain == adanorm.get_policy(name).chain == ("instance", "group", "layer", "identity")
        assert layer.policy.native_eval_rule  # still evaluates with its running statistics, as BatchNorm does


def test_sync_batchnorm_conversion_leaves_adaptive_layers():
    model = nn.Sequential(nn.Conv3d(1, 4, 1), adanorm.AdaptiveNorm3d(4), nn.BatchNorm3d(4))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], adanorm.AdaptiveNorm3d)
    assert isinstance(converted[2], nn.SyncBatchNorm)


def test_lightning_sync_batchnorm_plugin_leaves_adaptive_layers():
    plugins = pytest.importorskip("lightning.pytorch.plugins")
    model = nn.Sequential(nn.Conv3d(1, 4, 1), adanorm.AdaptiveNorm3d(4))
    converted = plugins.TorchSyncBatchNorm().apply(model)
    assert isinstance(converted[1], adanorm.AdaptiveNorm3d)


def test_momentum_presets():
    assert get_preset("default").factor(2, torch.tensor(5)) == 0.1
    assert get_preset("cumulative").factor(2, torch.tensor(4)).item() == 0.25
    auto = get_preset("auto")
    assert auto.factor(2, torch.tensor(1)).item() == 1.0  # first step: no bias toward the initial statistics
    assert auto.factor(2, torch.tensor(1000)).item() == pytest.approx(2 / 256)
    assert auto.factor(64, torch.tensor(1000)).item() == pytest.approx(64 / 256)
    layer = adanorm.AdaptiveNorm3d(3, preset="cumulative", mode="batch")
    native = nn.BatchNorm3d(3, momentum=None)
    for _ in range(4):
        x = torch.randn(2, 3, 2, 2, 2) * 5
        layer(x), native(x)
    torch.testing.assert_close(layer.running_mean, native.running_mean)
    auto_layer = adanorm.AdaptiveNorm3d(3, preset="auto", mode="batch")
    batches = [torch.randn(4, 3, 2, 2, 2) + i for i in range(3)]
    for x in batches:
        auto_layer(x)
    expected_mean = torch.stack([x.mean((0, 2, 3, 4)) for x in batches]).mean(0)  # cumulative while under the window
    torch.testing.assert_close(auto_layer.running_mean, expected_mean)


@pytest.mark.parametrize("mode", ["batch", "group"])
def test_parametrized_weight_is_used(mode):
    """The forward reads parameters from the module's dicts for speed; a parametrization (or weight
    norm) moves the weight out of them, and must still be what the layer applies."""
    layer = adanorm.AdaptiveNorm3d(4, mode=mode, num_groups=2)
    reference = nn.BatchNorm3d(4) if mode == "batch" else nn.GroupNorm(2, 4)
    for module in (layer, reference):
        nn.utils.parametrize.register_parametrization(module, "weight", _Doubled())
    x = torch.randn(2, 4, 3, 3, 3)
    expected = reference(x)
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(expected, nn.BatchNorm3d(4)(x) if mode == "batch" else nn.GroupNorm(2, 4)(x))


class _Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight + 1
