"""Real MONAI networks with norm="adaptive" and converted ResNets, at the shapes that break native norms."""
import warnings

import pytest
import torch
from monai.networks.layers.factories import Norm
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import DynUNet, UNet, resnet18

import adanorm
from adanorm import FallbackWarning

UNET_ARGS = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2))


@pytest.fixture(autouse=True)
def _quiet_fallbacks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        yield


def train_steps(model, batches, target_fn):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    for x in batches:
        loss = torch.nn.functional.cross_entropy(model(x), target_fn(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "optimizer steps changed nothing"


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_native_norms_crash_on_16_cubed(norm):
    """The failure adanorm exists for: the UNet bottleneck is 1x1x1 on a 16^3 patch."""
    with pytest.raises(ValueError, match="Expected more than 1"):
        UNet(**UNET_ARGS, norm=norm)(torch.randn(1, 1, 16, 16, 16))


@pytest.mark.parametrize("norm", ["adaptive", ("adaptive", {"preset": "small_batch"}), ("ADAPTIVE", {"num_groups": 4}),
                                  ("adaptive", {"policy": "instance_first"})])
def test_unet_trains_at_batch_1_and_2_then_evaluates(norm):
    model = UNet(**UNET_ARGS, norm=norm)
    layers = [m for m in model.modules() if isinstance(m, adanorm.AdaptiveNorm3d)]
    assert len(layers) >= 8
    batches = [torch.randn(1, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16)]
    train_steps(model, batches, lambda x: (x[:, 0] > 0).long())
    modes = {m.last_mode for m in layers}
    if isinstance(norm, tuple) and norm[1].get("policy") == "instance_first":
        assert "instance" in modes and modes & {"group", "layer"}, modes  # past instance at the 1x1x1 bottleneck
    else:  # the default chain below 32 samples: group statistics, layer ones where a group holds too few values
        assert "group" in modes and modes <= {"group", "layer"}, modes
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 16, 16, 16))
    assert y.shape == (1, 2, 16, 16, 16) and torch.isfinite(y).all()


@pytest.mark.slow
def test_converted_resnet18_trains_and_evaluates_at_batch_1():
    model = adanorm.convert(resnet18(spatial_dims=3, n_input_channels=1, num_classes=2))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert sum(isinstance(m, adanorm.AdaptiveNorm3d) for m in model.modules()) == 20
    batches = [torch.randn(1, 1, 16, 16, 16) for _ in range(2)]
    train_steps(model, batches, lambda x: torch.zeros(x.shape[0], dtype=torch.long))
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 16, 16, 16))
    assert y.shape == (1, 2) and torch.isfinite(y).all()


def test_dynunet_norm_name_and_get_norm_layer():
    model = DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], norm_name="adaptive")
    assert any(isinstance(m, adanorm.AdaptiveNorm3d) for m in model.modules())
    assert model(torch.randn(1, 1, 8, 8, 8)).shape[:2] == (1, 2)
    layer = get_norm_layer(("adaptive", {"preset": "tiny_batch", "num_groups": 4}), spatial_dims=3, channels=16)
    assert isinstance(layer, adanorm.AdaptiveNorm3d) and layer.num_groups == 4 and layer.momentum == 0.01
    for dim, cls in [(1, adanorm.AdaptiveNorm1d), (2, adanorm.AdaptiveNorm2d), (3, adanorm.AdaptiveNorm3d)]:
        assert Norm["adaptive", dim] is cls
