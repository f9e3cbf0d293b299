"""The fallback policy: which mode auto picks, that it never raises, and the eval rule."""
import inspect
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adanorm
from adanorm import FallbackError, FallbackWarning, Policy, choose_mode
from adanorm.policy import default_num_groups, designed_mode, is_fallback

SPATIAL = [(1, 1, 1), (1, 1, 2), (2, 2, 2), (4, 4, 4)]
GRID = list(itertools.product([1, 2, 8, 31, 32], [1, 2, 3, 64], SPATIAL))


def expected_per_sample_mode(channels, spatial):
    """The mode table in docs/layer.md for the per-sample modes in the default chain (group, instance, layer, identity),
    with the default thresholds (4 values per statistic)."""
    size = math.prod(spatial)
    if channels == 64 and 2 * size >= 4:  # default groups for 64 channels: 32 groups of 2
        return "group"
    if size >= 4:  # 1-3 channels have no group mode
        return "instance"
    if channels * size >= 2:
        return "layer"
    return "identity"


@pytest.mark.parametrize("batch,channels,spatial", GRID)
def test_fallback_table(batch, channels, spatial):
    shape = (batch, channels) + spatial
    layer = adanorm.AdaptiveNorm3d(channels)
    expected_train = "batch" if batch >= 32 else expected_per_sample_mode(channels, spatial)
    assert choose_mode(shape, True, layer.policy, layer.num_groups, False) == expected_train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        y = layer(torch.randn(shape))
    assert layer.last_mode == expected_train
    assert y.shape == shape and torch.isfinite(y).all()

    layer.eval()
    y = layer(torch.randn(shape))
    expected_eval = "batch" if batch >= 32 else expected_per_sample_mode(channels, spatial)
    assert layer.last_mode == expected_eval, "eval uses running stats only after batch-mode training"
    assert torch.isfinite(y).all()

    untrained = adanorm.AdaptiveNorm3d(channels).eval()
    untrained(torch.randn(shape))
    assert untrained.last_mode == expected_per_sample_mode(channels, spatial)


def test_never_normalizes_over_one_value():
    for shape in [(1, 1, 1, 1, 1), (2, 1, 1, 1, 1), (1, 1, 1, 1, 2)]:
        layer = adanorm.AdaptiveNorm3d(1, policy=Policy(min_batch_size=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            layer(torch.randn(shape))
        assert layer.last_mode != "identity" or math.prod(shape) == 1 or shape[0] * math.prod(shape[2:]) == 1


def test_default_num_groups():
    assert default_num_groups(64) == 32
    assert default_num_groups(320) == 32
    assert default_num_groups(48) == 24
    assert default_num_groups(6) == 3
    assert default_num_groups(3) == 1
    assert default_num_groups(7) == 1


def test_user_groups_must_divide_channels():
    with pytest.raises(ValueError, match="num_groups=5 does not divide num_features=64"):
        adanorm.AdaptiveNorm3d(64, num_groups=5)


def test_mode_changes_between_steps_keep_running_stats():
    layer = adanorm.AdaptiveNorm3d(4)
    native = nn.BatchNorm3d(4)
    for _ in range(5):
        big = torch.randn(32, 4, 3, 3, 3) * 2 + 1
        layer(big), native(big)
    assert layer.last_mode == "batch"
    stats = layer.running_mean.clone(), layer.running_var.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # group statistics below min_batch_size: the design
        layer(torch.randn(2, 4, 3, 3, 3))  # a smaller last batch
    assert layer.last_mode == "group"
    torch.testing.assert_close((layer.running_mean, layer.running_var), stats)
    with pytest.warns(FallbackWarning, match="fell back to 'layer' mode from 'group'"):  # 2 values per group
        layer(torch.randn(2, 4, 1, 1, 1))  # a different patch size
    assert layer.last_mode == "layer"
    assert layer.mode_counts == {"batch": 5, "instance": 0, "group": 1, "layer": 1, "identity": 0}
    assert int(layer.num_batches_tracked) == 5

    # Two smaller batches after five full ones: the statistics still describe the training, so eval uses them.
    layer.eval(), native.eval()
    for shape in [(1, 4, 1, 1, 1), (3, 4, 5, 2, 2)]:
        x = torch.randn(shape)
        torch.testing.assert_close(layer(x), native(x))
        assert layer.last_mode == "batch"

    # Training that moved to per-sample statistics for good: eval follows it (and the statistics are kept).
    layer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        for _ in range(8):
            layer(torch.randn(2, 4, 3, 3, 3))
    layer.eval()
    x = torch.randn(1, 4, 3, 3, 3)
    expected = F.group_norm(x, layer.num_groups, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    torch.testing.assert_close(layer(x), expected)
    assert layer.last_mode == "group" and layer.num_groups == 2
    torch.testing.assert_close((layer.running_mean, layer.running_var), (native.running_mean, native.running_var))


def test_trained_in_batch_mode_evaluates_like_batchnorm():
    layer, native = adanorm.AdaptiveNorm3d(6), nn.BatchNorm3d(6)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5), native.bias.uniform_(-1, 1)
    layer.load_state_dict(native.state_dict())
    for _ in range(5):
        x = torch.randn(32, 6, 2, 3, 2) * 3 - 1
        torch.testing.assert_close(layer(x), native(x))
    layer.eval(), native.eval()
    for shape in [(1, 6, 1, 1, 1), (1, 6, 4, 4, 4), (2, 6, 1, 2, 1)]:
        x = torch.randn(shape)
        torch.testing.assert_close(layer(x), native(x))


@pytest.mark.parametrize("policy,mode", [
    (Policy(), "group"),  # the default chain: group statistics below 32 samples
    (Policy(chain=adanorm.MODES), "instance"),  # batch, then instance first
])
def test_trained_in_a_per_sample_mode_evaluates_in_it(policy, mode):
    layer = adanorm.AdaptiveNorm3d(6, policy=policy)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        for _ in range(3):
            layer(torch.randn(2, 6, 4, 4, 4))
    assert layer.mode_counts["batch"] == 0 and not layer.has_learned_running_stats()
    assert layer.mode_counts[mode] == 3
    layer.eval()
    x = torch.randn(1, 6, 4, 5, 3)
    if mode == "instance":
        expected = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    else:
        expected = F.group_norm(x, 3, weight=layer.weight, bias=layer.bias, eps=layer.eps)  # 6 channels: 3 groups
    torch.testing.assert_close(layer(x), expected)
    assert layer.last_mode == mode


def test_checkpoint_with_zero_counter_still_uses_its_running_stats():
    native = nn.BatchNorm3d(3).eval()
    with torch.no_grad():
        native.running_mean.uniform_(-1, 1), native.running_var.uniform_(0.5, 2)
    state = native.state_dict()
    assert int(state["num_batches_tracked"]) == 0  # e.g. a checkpoint ported from another framework
    layer = adanorm.AdaptiveNorm3d(3).eval()
    layer.load_state_dict(state)
    x = torch.randn(1, 3, 1, 1, 1)
    torch.testing.assert_close(layer(x), native(x))
    assert layer.last_mode == "batch"


def test_strict_policy_raises_instead_of_falling_back():
    layer = adanorm.AdaptiveNorm3d(4, policy=Policy(strict=True))
    layer(torch.randn(32, 4, 2, 2, 2))
    layer(torch.randn(2, 4, 2, 2, 2))  # group statistics below min_batch_size: the design, not a fallback
    assert layer.last_mode == "group"
    with pytest.raises(FallbackError, match="fell back to 'layer' mode from 'group'.*strict=True"):
        layer(torch.randn(2, 4, 1, 1, 1))


class TwoBlocks(nn.Module):
    """A model with a forward of its own, so the warning must walk past user forward methods too."""

    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Conv3d(4, 4, 1), adanorm.AdaptiveNorm3d(4))
        self.second = nn.Sequential(nn.Conv3d(4, 4, 1), adanorm.AdaptiveNorm3d(4))

    def forward(self, x):
        return self.second(self.first(x))


def fallback_warnings(model, shapes):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # no help from Python's once-per-location registry
        for shape in shapes:
            model(torch.randn(shape)); line = inspect.currentframe().f_lineno  # noqa: E702 - the call's own line
    return [w for w in caught if issubclass(w.category, FallbackWarning)], line


def test_one_warning_per_model_and_regime_at_the_calling_line():
    model = TwoBlocks()
    caught, _ = fallback_warnings(model, [(2, 4, 2, 2, 2)] * 2)  # group statistics below min_batch_size: the design
    assert caught == []
    caught, line = fallback_warnings(model, [(2, 4, 1, 1, 1)] * 3)  # 2 values per group: too few for group mode
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line), "points at the line that called the model"
    assert str(caught[0].message).split(" for ")[0] == "AdaptiveNorm3d(4) fell back to 'layer' mode from 'group'"
    assert "(TwoBlocks.first.1)" in str(caught[0].message)

    caught, _ = fallback_warnings(model, [(2, 4, 2, 2, 2), (2, 4, 1, 1, 1)])  # the design, then the reported regime
    assert caught == []
    caught, _ = fallback_warnings(model.eval(), [(2, 4, 1, 1, 1)])  # eval without running statistics: another regime
    assert len(caught) == 1 and "from 'group'" in str(caught[0].message) and "in eval" in str(caught[0].message)

    caught, _ = fallback_warnings(TwoBlocks(), [(2, 4, 1, 1, 1)])  # another model is told again
    assert len(caught) == 1
    for layer in (model.first[1], model.second[1]):
        assert layer.mode_counts["group"] == 3 and layer.mode_counts["layer"] == 5  # telemetry counts every call


def test_no_warning_while_the_designed_mode_runs():
    layer = adanorm.AdaptiveNorm3d(4, policy="instance_first")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        layer(torch.randn(1, 4, 2, 2, 2)), layer.eval()(torch.randn(3, 4, 2, 1, 1))
    assert layer.mode_counts["instance"] == 2
    trained = adanorm.AdaptiveNorm3d(4)
    for _ in range(3):
        trained(torch.randn(32, 4, 2, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        trained.eval()(torch.randn(1, 4, 1, 1, 1))  # running statistics: no fallback at any shape
    assert trained.last_mode == "batch"


def test_a_layer_without_group_mode_does_not_fall_back_from_it():
    """Group mode comes before instance in the default chain, but a layer with one group (C < 4, prime C)
    has no group mode at any shape: its chain starts at instance mode, so eval runs it without a
    warning and a strict policy accepts it; only shape-driven steps count as fallbacks."""
    layer = adanorm.AdaptiveNorm3d(3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        layer(torch.randn(2, 3, 4, 4, 4))
    assert layer.num_groups == 1 and layer.last_mode == "instance"
    strict = adanorm.AdaptiveNorm3d(7, policy=Policy(strict=True)).eval()
    strict(torch.randn(2, 7, 4, 4, 4))
    assert strict.last_mode == "instance"
    with pytest.raises(FallbackError, match="fell back to 'layer' mode from 'instance'"):
        strict(torch.randn(2, 7, 1, 1, 1))
    strict.train()(torch.randn(2, 7, 4, 4, 4))  # below 32 samples instance statistics are its design in training too
    assert strict.last_mode == "instance"
    converted = adanorm.convert(nn.GroupNorm(1, 6))  # layer norm written as GroupNorm: a chain from group mode
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        converted(torch.randn(2, 6, 4, 4, 4))
    assert converted.last_mode == "layer"
    shape = (2, 8, 4, 4, 4)
    assert designed_mode(shape, False, Policy(), 1) == "instance" and designed_mode(shape, False, Policy(), 4) == "group"
    assert is_fallback("instance", shape, False, Policy(), False, 4)
    assert not is_fallback("instance", shape, False, Policy(), False, 1)


@pytest.mark.parametrize("batch,channels,spatial", GRID)
def test_warns_only_where_the_spatial_size_forces_a_later_mode(batch, channels, spatial):
    """The designed mode is what the batch size alone chooses (the mode table's first column that the layer
    has): batch from 32 samples, else group (64 channels: 32 groups) or instance (1-3 channels: no group mode).
    Only a spatial size too small for it is a fallback: it warns and is recorded in ``last_fallback_from``."""
    shape = (batch, channels) + spatial
    designed = "batch" if batch >= 32 else "group" if channels == 64 else "instance"
    for training in (True, False):
        layer = adanorm.AdaptiveNorm3d(channels).train(training)  # untrained: eval walks the per-sample modes
        ran = "batch" if training and batch >= 32 else expected_per_sample_mode(channels, spatial)
        expected = designed if training else designed.replace("batch", "group" if channels == 64 else "instance")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer(torch.randn(shape))
        messages = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
        assert layer.last_mode == ran
        if ran == expected:
            assert messages == [] and layer.last_fallback_from is None
            assert not is_fallback(ran, shape, training, layer.policy, False, layer.num_groups)
        else:
            assert len(messages) == 1 and f"fell back to {ran!r} mode from {expected!r}" in messages[0]
            assert layer.last_fallback_from == expected


def test_a_chain_without_a_mode_for_the_batch_size_warns():
    """Nothing in ``chain=("batch",)`` serves 2 samples: the identity auto mode runs instead is a fallback."""
    layer = adanorm.AdaptiveNorm3d(4, policy=Policy(chain=("batch",)))
    with pytest.warns(FallbackWarning, match="fell back to 'identity' mode from 'batch'"):
        layer(torch.randn(2, 4, 4, 4, 4))
    assert designed_mode((2, 4, 4, 4, 4), True, Policy(chain=("batch", "identity")), 2) == "identity"


def readme_unet(norm="adaptive"):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2),
                norm=norm)


def test_readme_unet_at_batch_1_gives_no_warning():
    """The README's headline network at batch 1 on a 32³ patch runs group statistics in every layer, as designed
    (batch 1 < min_batch_size): training and eval say nothing."""
    net = readme_unet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(torch.randn(1, 1, 32, 32, 32)).sum().backward()
        net.eval()(torch.randn(1, 1, 32, 32, 32))
    assert [str(w.message) for w in caught] == []
    layers = [m for m in net.modules() if isinstance(m, adanorm.AdaptiveNorm)]
    assert len(layers) == 8 and all(layer.mode_counts["group"] == 2 for layer in layers)


@pytest.mark.parametrize("norm, message", [
    ("adaptive", "AdaptiveNorm3d(64) fell back to 'layer' mode from 'group'"),  # 32 groups of 2 values at 1×1×1
    (("adaptive", {"policy": "instance_first"}), "AdaptiveNorm3d(64) fell back to 'group' mode from 'instance'"),
])
def test_readme_unet_warns_once_where_the_patch_is_too_small(norm, message):
    """On a 16³ patch the two innermost layers are 1×1×1: too small for the mode the batch size chose."""
    net = readme_unet(norm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(torch.randn(1, 1, 16, 16, 16)).sum().backward()
    assert len(caught) == 1 and issubclass(caught[0].category, FallbackWarning), [str(w.message) for w in caught]
    assert str(caught[0].message).startswith(message)


def test_nonfinite_warning_points_at_the_calling_line():
    model = nn.Sequential(adanorm.AdaptiveNorm3d(4))
    x = torch.randn(32, 4, 2, 2, 2)  # batch mode, which updates the running statistics
    x[0, 0, 0, 0, 0] = float("nan")
    with pytest.warns(adanorm.NonFiniteStatsWarning) as caught:
        model(x); line = inspect.currentframe().f_lineno  # noqa: E702 - the call's own line
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_default_policy():
    """Batch from 32 samples, then group before instance (the small-batch study, STUDY.md); MODES keeps its order."""
    assert Policy().chain == adanorm.policy.DEFAULT_CHAIN == ("batch", "group", "instance", "layer", "identity")
    assert Policy().min_batch_size == 32
    assert adanorm.MODES == ("batch", "instance", "group", "layer", "identity")
    assert choose_mode((31, 8, 4, 4, 4), True, Policy(), 4, False) == "group"
    assert choose_mode((32, 8, 4, 4, 4), True, Policy(), 4, False) == "batch"
    assert choose_mode((31, 8, 4, 4, 4), True, Policy(), 1, False) == "instance"  # no group mode
    assert choose_mode((2, 8, 4, 4, 4), False, Policy(), 4, False) == "group"  # eval without running statistics


def test_named_policies_say_their_chain():
    for name, policy in adanorm.NAMED_POLICIES.items():
        parts = tuple(name.split("_"))
        assert policy.chain[:len(parts)] == parts, f"{name!r} walks {policy.chain}"
    assert adanorm.AdaptiveNorm3d(4, policy="batch_group_instance").policy == Policy()
    design = adanorm.AdaptiveNorm3d(4, policy="batch_instance_group").policy
    assert design.chain == ("batch", "instance", "group", "layer", "identity"), "the design card's chain"
    assert design.min_batch_size == Policy().min_batch_size
    assert choose_mode((2, 8, 4, 4, 4), True, design, 4, False) == "instance"
    assert choose_mode((2, 8, 1, 1, 1), True, design, 4, False) == "layer"  # (8/4)·1 values: too few for group
    assert choose_mode((32, 8, 4, 4, 4), True, design, 4, False) == "batch"
    instance_first = adanorm.AdaptiveNorm3d(4, policy="instance_group_layer").policy
    assert instance_first.chain == ("instance", "group", "layer", "identity")
    assert instance_first.min_instance_size == 2, "instance statistics wherever nn.InstanceNorm3d computes them"
    assert adanorm.AdaptiveNorm3d(4, policy="group_layer").policy.chain == ("group", "layer", "identity")
    assert choose_mode((1, 4, 1, 1, 2), True, "instance_group_layer", 2, False) == "instance"
    with pytest.raises(ValueError, match=r"policy='instance'.*\['batch_group_instance', 'batch_instance_group', "
                                         r"'group_layer', 'instance_group_layer'\]"):
        adanorm.AdaptiveNorm3d(4, policy="instance")


@pytest.mark.parametrize("alias", sorted(adanorm.policy.POLICY_ALIASES))
def test_earlier_policy_names_still_work(alias):
    expected = adanorm.NAMED_POLICIES[adanorm.policy.POLICY_ALIASES[alias]]
    assert adanorm.AdaptiveNorm3d(4, policy=alias).policy == expected
    assert adanorm.get_policy(alias) == expected


def test_policy_is_pure_and_validated():
    policy = Policy(min_batch_size=2)
    assert choose_mode((2, 8, 1, 1, 1), True, policy, 4, False) == "batch"
    assert choose_mode((1, 8, 1, 1, 1), True, policy, 2, False) == "group"
    assert choose_mode((1, 8, 1, 1, 1), True, policy, 4, False) == "layer"  # 2 values per group < min_group_size
    assert choose_mode((1, 8, 1, 1, 1), False, policy, 4, True) == "batch"
    with pytest.raises(ValueError, match="min_batch_size=0"):
        Policy(min_batch_size=0)
    with pytest.raises(ValueError, match="unknown modes"):
        Policy(chain=("batch", "spectral"))
