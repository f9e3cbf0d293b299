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
from adanorm.policy import default_num_groups

SPATIAL = [(1, 1, 1), (1, 1, 2), (2, 2, 2), (4, 4, 4)]
GRID = list(itertools.product([1, 2, 8], [1, 2, 3, 64], SPATIAL))


def expected_per_sample_mode(channels, spatial):
    """The README table for the per-sample modes, with the default thresholds (4 values per statistic)."""
    size = math.prod(spatial)
    if size >= 4:
        return "instance"
    if channels == 64 and 2 * size >= 4:  # default groups for 64 channels: 32 groups of 2
        return "group"
    if channels * size >= 2:
        return "layer"
    return "identity"


@pytest.mark.parametrize("batch,channels,spatial", GRID)
def test_fallback_table(batch, channels, spatial):
    shape = (batch, channels) + spatial
    layer = adanorm.AdaptiveNorm3d(channels)
    expected_train = "batch" if batch >= 8 else expected_per_sample_mode(channels, spatial)
    assert choose_mode(shape, True, layer.policy, layer.num_groups, False) == expected_train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        y = layer(torch.randn(shape))
    assert layer.last_mode == expected_train
    assert y.shape == shape and torch.isfinite(y).all()

    layer.eval()
    y = layer(torch.randn(shape))
    expected_eval = "batch" if batch >= 8 else expected_per_sample_mode(channels, spatial)
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
            y = layer(torch.randn(shape))
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
        big = torch.randn(8, 4, 3, 3, 3) * 2 + 1
        layer(big), native(big)
    assert layer.last_mode == "batch"
    stats = layer.running_mean.clone(), layer.running_var.clone()
    with pytest.warns(FallbackWarning, match="fell back to 'instance' mode from 'batch'"):
        y = layer(torch.randn(2, 4, 3, 3, 3))  # a smaller last batch
    assert layer.last_mode == "instance"
    torch.testing.assert_close((layer.running_mean, layer.running_var), stats)
    with pytest.warns(FallbackWarning, match="fell back to 'layer' mode from 'batch'"):  # a new regime warns
        layer(torch.randn(2, 4, 1, 1, 1))  # a different patch size
    assert layer.last_mode == "layer"
    assert layer.mode_counts == {"batch": 5, "instance": 1, "group": 0, "layer": 1, "identity": 0}
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
        warnings.simplefilter("error", FallbackWarning)  # this regime warned already: no second warning
        for _ in range(8):
            layer(torch.randn(2, 4, 3, 3, 3))
    layer.eval()
    x = torch.randn(1, 4, 3, 3, 3)
    torch.testing.assert_close(layer(x), F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps))
    assert layer.last_mode == "instance"
    torch.testing.assert_close((layer.running_mean, layer.running_var), (native.running_mean, native.running_var))


def test_trained_in_batch_mode_evaluates_like_batchnorm():
    layer, native = adanorm.AdaptiveNorm3d(6), nn.BatchNorm3d(6)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5), native.bias.uniform_(-1, 1)
    layer.load_state_dict(native.state_dict())
    for _ in range(5):
        x = torch.randn(8, 6, 2, 3, 2) * 3 - 1
        torch.testing.assert_close(layer(x), native(x))
    layer.eval(), native.eval()
    for shape in [(1, 6, 1, 1, 1), (1, 6, 4, 4, 4), (2, 6, 1, 2, 1)]:
        x = torch.randn(shape)
        torch.testing.assert_close(layer(x), native(x))


def test_trained_in_instance_mode_evaluates_like_instance_norm():
    layer = adanorm.AdaptiveNorm3d(6)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        for _ in range(3):
            layer(torch.randn(2, 6, 4, 4, 4))
    assert layer.mode_counts["batch"] == 0 and not layer.has_learned_running_stats()
    layer.eval()
    x = torch.randn(1, 6, 4, 5, 3)
    expected = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    torch.testing.assert_close(layer(x), expected)
    assert layer.last_mode == "instance"


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
    layer(torch.randn(8, 4, 2, 2, 2))
    with pytest.raises(FallbackError, match="fell back to 'instance'.*strict=True"):
        layer(torch.randn(2, 4, 2, 2, 2))


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
            model(torch.randn(shape)); line = inspect.currentframe().f_lineno
    return [w for w in caught if issubclass(w.category, FallbackWarning)], line


def test_one_warning_per_model_and_regime_at_the_calling_line():
    model = TwoBlocks()
    caught, line = fallback_warnings(model, [(2, 4, 2, 2, 2)] * 3)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line), "points at the line that called the model"
    assert "fell back to 'instance' mode from 'batch'" in str(caught[0].message)
    assert "(TwoBlocks.first.1)" in str(caught[0].message)

    caught, _ = fallback_warnings(model, [(2, 4, 1, 1, 1)] * 2 + [(2, 4, 2, 2, 2)])  # a new regime, then the old one
    assert [str(w.message).split(" for ")[0] for w in caught] == ["AdaptiveNorm3d(4) fell back to 'layer' mode from 'batch'"]
    caught, _ = fallback_warnings(model.eval(), [(2, 4, 1, 1, 1)])  # eval without running statistics: another regime
    assert len(caught) == 1 and "from 'instance'" in str(caught[0].message) and "in eval" in str(caught[0].message)

    caught, _ = fallback_warnings(TwoBlocks(), [(2, 4, 2, 2, 2)])  # another model is told again
    assert len(caught) == 1
    for layer in (model.first[1], model.second[1]):
        assert layer.mode_counts["instance"] == 4 and layer.mode_counts["layer"] == 3  # telemetry counts every call


def test_no_warning_while_the_first_choice_runs():
    layer = adanorm.AdaptiveNorm3d(4, policy="instance_first")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        layer(torch.randn(1, 4, 2, 2, 2)), layer.eval()(torch.randn(3, 4, 2, 1, 1))
    assert layer.mode_counts["instance"] == 2
    trained = adanorm.AdaptiveNorm3d(4)
    for _ in range(3):
        trained(torch.randn(8, 4, 2, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        trained.eval()(torch.randn(1, 4, 1, 1, 1))  # running statistics: no fallback at any shape
    assert trained.last_mode == "batch"


def test_nonfinite_warning_points_at_the_calling_line():
    model = nn.Sequential(adanorm.AdaptiveNorm3d(4))
    x = torch.randn(8, 4, 2, 2, 2)
    x[0, 0, 0, 0, 0] = float("nan")
    with pytest.warns(adanorm.NonFiniteStatsWarning) as caught:
        model(x); line = inspect.currentframe().f_lineno
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_named_policies():
    assert adanorm.AdaptiveNorm3d(4, policy="batch_first").policy == Policy()
    instance_first = adanorm.AdaptiveNorm3d(4, policy="instance_first").policy
    assert instance_first.chain == ("instance", "group", "layer", "identity")
    assert instance_first.min_instance_size == 2, "instance statistics wherever nn.InstanceNorm3d computes them"
    assert adanorm.AdaptiveNorm3d(4, policy="group_first").policy.chain == ("group", "layer", "identity")
    assert choose_mode((1, 4, 1, 1, 2), True, "instance_first", 2, False) == "instance"
    with pytest.raises(ValueError, match=r"policy='instance'.*\['batch_first', 'group_first', 'instance_first'\]"):
        adanorm.AdaptiveNorm3d(4, policy="instance")


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
