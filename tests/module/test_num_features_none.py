"""``num_features=None`` wherever the native module takes it: ``nn.InstanceNorm3d(None)`` builds without a
channel count (no affine, no running statistics), and MONAI's ADN passes None when it has no in_channels.
The adaptive layers then take C from the first input, as torch's lazy modules do."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN
from torch import nn

import adanorm
from adanorm.tiling import norm_statistics

pytestmark = pytest.mark.filterwarnings("ignore::adanorm.FallbackWarning")


def round_trip(scripted):
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("layer_class, shape", [(adanorm.AdaptiveNorm1d, (2, 8, 5)), (adanorm.AdaptiveNorm2d, (2, 8, 5, 5)),
                                                (adanorm.AdaptiveNorm3d, (2, 8, 3, 4, 5))])
def test_none_builds_what_native_instance_norm_builds_and_infers_c(layer_class, shape):
    layer = layer_class(None)
    native = {adanorm.AdaptiveNorm1d: nn.InstanceNorm1d, adanorm.AdaptiveNorm2d: nn.InstanceNorm2d,
              adanorm.AdaptiveNorm3d: nn.InstanceNorm3d}[layer_class](None)
    assert not layer.affine and not layer.track_running_stats
    assert layer.state_dict().keys() == native.state_dict().keys() == set()
    assert list(layer.parameters()) == [] and list(layer.buffers()) == []
    x = torch.randn(shape) * 3 + 1
    torch.testing.assert_close(layer(x), F.group_norm(x, 4))  # 8 channels: group mode, 4 groups of 2, as for num_features=8
    assert (layer.num_features, layer.num_groups, layer.last_mode) == (8, 4, "group")
    with pytest.raises(ValueError, match="expected 8 channels"):
        layer(torch.randn(2, 6, *shape[2:]))


def test_none_with_the_instance_policy_equals_native_instance_norm_none():
    layer, native = adanorm.AdaptiveNorm3d(None, policy="instance_group_layer"), nn.InstanceNorm3d(None)
    x = torch.randn(2, 5, 4, 4, 4) * 2 - 1
    torch.testing.assert_close(layer(x), native(x))
    torch.testing.assert_close(layer(x[:, :, :1, :1, :1]), F.layer_norm(x[:, :, :1, :1, :1], (5, 1, 1, 1)))  # native raises


@pytest.mark.parametrize("kwargs, named", [({"affine": True}, "affine"), ({"track_running_stats": True}, "track_running_stats"),
                                           ({"affine": True, "track_running_stats": True}, "affine and track_running_stats")])
def test_none_with_per_channel_state_raises_naming_the_fix(kwargs, named):
    with pytest.raises(ValueError, match=rf"num_features=None.*per-channel {named}.*pass num_features=C"):
        adanorm.AdaptiveNorm3d(None, **kwargs)


def test_none_with_explicit_false_and_a_group_count_that_does_not_divide_c():
    layer = adanorm.AdaptiveNorm3d(None, affine=False, track_running_stats=False, num_groups=3)
    with pytest.raises(ValueError, match=r"num_features=None\) got 8 channels: num_groups=3 does not divide"):
        layer(torch.randn(2, 8, 2, 2, 2))
    layer(torch.randn(2, 9, 2, 2, 2))
    assert (layer.num_features, layer.num_groups) == (9, 3)


def test_an_int_num_features_keeps_its_defaults():
    layer = adanorm.AdaptiveNorm3d(8)
    assert layer.affine and layer.track_running_stats and sorted(layer.state_dict()) == sorted(nn.BatchNorm3d(8).state_dict())


def test_state_dict_round_trip_of_a_network_with_none_layers():
    def network():
        return nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), adanorm.AdaptiveNorm3d(None), nn.ReLU(), nn.Conv3d(6, 2, 1))

    torch.manual_seed(0)
    trained = network()
    x = torch.randn(2, 1, 4, 4, 4)
    expected = trained(x)
    fresh = network()
    fresh.load_state_dict(trained.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), expected)
    fresh.load_state_dict(nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.InstanceNorm3d(None), nn.ReLU(),
                                        nn.Conv3d(6, 2, 1)).state_dict(), strict=True)  # native's layout


@pytest.mark.parametrize("ran_before_scripting", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_scripted_none_layer_infers_c_and_equals_eager(ran_before_scripting, training):
    eager = adanorm.AdaptiveNorm3d(None).train(training)
    x = torch.randn(2, 12, 3, 3, 3)
    if ran_before_scripting:
        eager(x)
    scripted = round_trip(torch.jit.script(copy.deepcopy(eager)))
    torch.testing.assert_close(scripted(x), eager(x))
    assert (scripted.num_features, scripted.num_groups) == (12, 6)
    with pytest.raises(torch.jit.Error, match="expected 12 channels"):
        scripted(torch.randn(2, 4, 3, 3, 3))
    torch.testing.assert_close(scripted(x[:1, :, :1, :1, :1]), eager(x[:1, :, :1, :1, :1]))  # a fallback too


def test_monai_adn_without_in_channels_builds_an_adaptive_layer_like_its_instance_norm():
    """ADN(norm=..., no in_channels) passes num_features=None; with the instance-first policy the adaptive
    block equals MONAI's own instance-norm block, and it scripts."""
    adaptive = ADN(ordering="NDA", norm="adaptive", norm_dim=3)
    assert isinstance(adaptive.N, adanorm.AdaptiveNorm3d) and adaptive.N.num_features is None
    x = torch.randn(2, 6, 4, 4, 4)
    adaptive(x)
    assert adaptive.N.num_features == 6 and adaptive.N.last_mode == "group"
    instance_first = ADN(ordering="NDA", norm=("adaptive", {"policy": "instance_group_layer"}), norm_dim=3)
    native = ADN(ordering="NDA", norm="instance", norm_dim=3)
    torch.testing.assert_close(instance_first(x), native(x))
    scripted = round_trip(torch.jit.script(ADN(ordering="NDA", norm="adaptive", norm_dim=3)))
    torch.testing.assert_close(scripted(x), adaptive(x))


@pytest.mark.parametrize("build", [lambda: nn.InstanceNorm3d(None),
                                   lambda: adanorm.AdaptiveNorm3d(None, policy="instance_group_layer")],
                         ids=["native", "adaptive"])
def test_volume_statistics_reach_instance_norm_layers_built_with_none(build):
    """norm_statistics takes C from the input, not from num_features, which these layers leave None: each
    tile is normalized with the whole volume's statistics."""
    volume = torch.randn(1, 3, 8, 4, 4) + torch.linspace(-2, 2, 8).view(1, 1, 8, 1, 1)
    tiles = [volume[:, :, :4], volume[:, :, 4:]]
    model = nn.Sequential(build()).eval()
    with norm_statistics(model, "volume") as stats:
        stats.gather(lambda: [model(tile) for tile in tiles])
        tiled = torch.cat([model(tile) for tile in tiles], dim=2)
    torch.testing.assert_close(tiled, F.instance_norm(volume))
