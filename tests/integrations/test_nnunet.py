"""nnU-Net: AdaptiveNorm3d named in the plans as ``norm_op``, built as nnU-Net builds its networks.

nnU-Net resolves the dotted strings of ``_kw_requires_import`` with ``pydoc.locate`` and passes
``norm_op_kwargs`` as they stand in the JSON plans, so everything adanorm needs there is plain values.
"""
import copy
import json
import pydoc
import warnings

import pytest
import torch
from torch import nn

import adanorm

pytest.importorskip("dynamic_network_architectures", reason="nnU-Net's networks: pip install -e '.[test]'")

# Three stages of two convolutions on a 4×4×4 patch: the bottleneck is 1×1×1, where InstanceNorm3d raises.
ARCHITECTURE = json.loads("""
{
  "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
  "arch_kwargs": {
    "n_stages": 3,
    "features_per_stage": [4, 8, 16],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2],
    "conv_bias": true,
    "norm_op": "adanorm.AdaptiveNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": true, "track_running_stats": false, "policy": "instance_first"},
    "dropout_op": null,
    "dropout_op_kwargs": null,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": true}
  },
  "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]
}
""")
STOCK_NORM = {"norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True}}
PATCH = (2, 1, 4, 4, 4)  # nnU-Net's batch size 2
LARGE_PATCH = (1, 1, 8, 8, 8)  # a 2×2×2 bottleneck: stock InstanceNorm3d runs everywhere


def build_like_nnunet(architecture: dict, **norm: object) -> nn.Module:
    """nnunetv2.utilities.get_network_from_plans: locate the dotted names, construct, initialize."""
    kwargs = {**copy.deepcopy(architecture["arch_kwargs"]), **norm}
    for key in architecture["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network = pydoc.locate(architecture["network_class_name"])(
        input_channels=1, num_classes=2, deep_supervision=False, **kwargs)
    network.apply(network.initialize)
    return network


def norms(network: nn.Module) -> dict:
    return {name: module for name, module in network.named_modules() if isinstance(module, adanorm.AdaptiveNorm3d)}


def test_plans_string_resolves_to_the_layer():
    assert pydoc.locate(ARCHITECTURE["arch_kwargs"]["norm_op"]) is adanorm.AdaptiveNorm3d


def test_instance_norm_cannot_train_on_the_bottleneck():
    stock = build_like_nnunet(ARCHITECTURE, **STOCK_NORM)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        stock(torch.randn(PATCH))


def test_trains_on_the_bottleneck_warning_once_for_its_fallback():
    torch.manual_seed(0)
    network = build_like_nnunet(ARCHITECTURE)
    layers = norms(network)
    bottleneck = {name for name in layers if name.startswith("encoder.stages.2.")}
    assert len(layers) == 10 and len(bottleneck) == 2
    before = copy.deepcopy(network.state_dict())
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)  # nnU-Net's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x, target = torch.randn(PATCH), torch.randint(0, 2, PATCH[:1] + PATCH[2:])
            loss = nn.functional.cross_entropy(network(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)
    changed = {key for key, value in network.state_dict().items() if not torch.equal(before[key], value)}
    norm_parameters = {f"{name}.{parameter}" for name in layers for parameter in ("weight", "bias")}
    assert norm_parameters | {key for key in before if key.endswith("conv.weight")} <= changed

    fallbacks = [w for w in caught if issubclass(w.category, adanorm.FallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]  # one for the model, not one per layer
    message = str(fallbacks[0].message)
    assert "fell back to 'group' mode from 'instance'" in message and "(PlainConvUNet.encoder.stages.2." in message
    assert fallbacks[0].filename == __file__
    for name, layer in layers.items():  # instance, as nnU-Net asked, wherever InstanceNorm3d could run
        assert layer.mode_counts["instance"] == (0 if name in bottleneck else 3), name
        assert layer.mode_counts["group"] == (3 if name in bottleneck else 0), name


def test_checkpoints_load_strictly_both_ways():
    torch.manual_seed(0)
    stock, adaptive = build_like_nnunet(ARCHITECTURE, **STOCK_NORM), build_like_nnunet(ARCHITECTURE)
    with torch.no_grad():  # norm parameters other than the initial 1/0, so a missed copy shows
        for module in list(stock.modules()) + list(adaptive.modules()):
            if isinstance(module, (nn.InstanceNorm3d, adanorm.AdaptiveNorm3d)):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
    x = torch.randn(LARGE_PATCH)
    for source, target in [(stock, build_like_nnunet(ARCHITECTURE)), (adaptive, build_like_nnunet(ARCHITECTURE, **STOCK_NORM))]:
        target.load_state_dict(source.state_dict(), strict=True)
        source.eval(), target.eval()
        with torch.no_grad():
            torch.testing.assert_close(target(x), source(x))


def test_tracked_running_stats_break_the_stock_checkpoint_layout():
    """Why the plans say track_running_stats: false (nn.InstanceNorm3d's default; AdaptiveNorm3d's is BatchNorm3d's)."""
    tracked = build_like_nnunet(ARCHITECTURE, norm_op_kwargs={"eps": 1e-05, "affine": True, "policy": "instance_first"})
    with pytest.raises(RuntimeError, match="Unexpected key.*running_mean"):
        build_like_nnunet(ARCHITECTURE, **STOCK_NORM).load_state_dict(tracked.state_dict(), strict=True)


FUSED = {"norm_op": "adanorm.AdaptiveNormAct3d",
         "norm_op_kwargs": {"eps": 1e-05, "affine": True, "track_running_stats": False, "policy": "instance_first",
                            "activation": "leaky_relu", "negative_slope": 0.01, "inplace": True},
         "nonlin": "torch.nn.Identity"}


def test_plans_can_name_the_fused_layer_with_an_identity_nonlin():
    """docs/nnunet.md: ``norm_op`` AdaptiveNormAct3d, ``nonlin`` Identity (its ``inplace`` kwarg is ignored). The
    network is stock nnU-Net's (InstanceNorm3d + LeakyReLU) in numbers and in checkpoint layout."""
    torch.manual_seed(0)
    architecture = copy.deepcopy(ARCHITECTURE)
    architecture["arch_kwargs"]["nonlin"] = FUSED["nonlin"]
    fused = build_like_nnunet(architecture, norm_op=FUSED["norm_op"], norm_op_kwargs=FUSED["norm_op_kwargs"])
    stock = build_like_nnunet(ARCHITECTURE, **STOCK_NORM)
    assert sum(isinstance(m, adanorm.AdaptiveNormAct3d) for m in fused.modules()) == 10
    fused.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(LARGE_PATCH)
    torch.testing.assert_close(fused(x), stock(x))
    fused(torch.randn(PATCH)).sum().backward()  # the 1×1×1 bottleneck trains, fused
