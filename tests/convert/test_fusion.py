"""convert(model, fuse_activation=True) on real networks: MONAI's DynUNet (basic and residual blocks) and UNet
(ADN with PReLU), nnU-Net's PlainConvUNet, and plain Sequentials. A fused network must compute what the
unfused converted one computes, output and every gradient, within float32's own error against float64,
and revert must give back exactly the native network."""
import copy
import io
import warnings

import pytest
import torch
from monai.networks.nets import DynUNet, UNet
from torch import nn

import adanorm
from adanorm.fusion import FusedActivationSlot

pytestmark = pytest.mark.filterwarnings("ignore::adanorm.FallbackWarning")


def dynunet(res_block):
    return DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], norm_name="instance",
                   res_block=res_block)


def nnunet(name):
    architectures = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    kwargs = dict(input_channels=1, n_stages=3, features_per_stage=(4, 8, 16), conv_op=nn.Conv3d, kernel_sizes=3,
                  strides=(1, 2, 2), num_classes=2, n_conv_per_stage_decoder=(2, 2), conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True})
    if name == "PlainConvUNet":
        return architectures.PlainConvUNet(n_conv_per_stage=(2, 2, 2), **kwargs)
    return architectures.ResidualEncoderUNet(n_blocks_per_stage=(1, 2, 2), **kwargs)


NETWORKS = {
    "DynUNet": (lambda: dynunet(False), 10),
    "DynUNet-res": (lambda: dynunet(True), 7),  # a residual block fuses norm1 only: norm2 meets the sum
    "UNet-PReLU": (lambda: UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm="batch"), 9),
    "PlainConvUNet": (lambda: nnunet("PlainConvUNet"), 10),
    "ResidualEncoderUNet": (lambda: nnunet("ResidualEncoderUNet"), 10),  # conv2 of a residual block meets the sum
}


def outputs_and_gradients(model, x, names):
    model.train()
    output = model(x)
    parameters = dict(model.named_parameters())
    grads = torch.autograd.grad(output.square().sum(), [parameters[name] for name in names], allow_unused=True)
    return [output.detach().double()] + [g.double() for g in grads if g is not None]  # unused: deep-supervision heads


@pytest.mark.parametrize("name", list(NETWORKS))
def test_fused_network_equals_the_unfused_one_and_reverts_to_the_native_one(name):
    build, expected_fusions = NETWORKS[name]
    torch.manual_seed(0)
    native = build()
    unfused = adanorm.convert(copy.deepcopy(native))
    fused = copy.deepcopy(unfused)
    names_by_id = {id(p): n for n, p in fused.named_parameters()}
    fused = adanorm.fusion.fuse_activations(fused)
    assert sum(isinstance(m, adanorm.AdaptiveNormAct) for m in fused.modules()) == expected_fusions
    # the same parameter objects, some under new names (a PReLU's slopes move into the norm)
    renamed = {names_by_id[id(p)]: n for n, p in fused.named_parameters()}
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    reference = outputs_and_gradients(copy.deepcopy(unfused).double(), x, list(renamed))
    native32 = outputs_and_gradients(copy.deepcopy(unfused), x.float(), list(renamed))
    fused32 = outputs_and_gradients(copy.deepcopy(fused), x.float(), list(renamed.values()))
    for index, (got, native_result, expected) in enumerate(zip(fused32, native32, reference)):
        fused_error = (got - expected).abs().max().item()
        native_error = (native_result - expected).abs().max().item()
        assert fused_error <= 8 * native_error + 1e-6 * expected.abs().max().item(), (index, fused_error, native_error)
    reverted = adanorm.revert(copy.deepcopy(fused))
    assert str(reverted) == str(native)
    assert reverted.state_dict().keys() == native.state_dict().keys()
    for key, value in native.state_dict().items():
        torch.testing.assert_close(reverted.state_dict()[key], value)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_checkpoints_move_strictly_between_native_converted_and_fused_networks(name):
    """MONAI's UNet holds a PReLU after each norm: the fused layer takes it, and its slopes keep their native keys."""
    torch.manual_seed(0)
    native = NETWORKS[name][0]()
    native.train()(torch.randn(2, 1, 16, 16, 16))  # running statistics that are not the initial ones
    with torch.no_grad():
        for parameter in native.parameters():
            parameter.add_(torch.rand_like(parameter) * 0.01)  # PReLU slopes, γ and β off their initial values
    fused = adanorm.convert(NETWORKS[name][0](), fuse_activation=True)
    assert fused.state_dict().keys() == native.state_dict().keys()
    fused.load_state_dict(native.state_dict(), strict=True)
    for key, value in native.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, msg=key)
    x = torch.randn(2, 1, 16, 16, 16)
    torch.testing.assert_close(fused.eval()(x), native.eval()(x))
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    back = NETWORKS[name][0]()
    back.load_state_dict(torch.load(buffer), strict=True)
    torch.testing.assert_close(back.eval()(x), native(x))
    reverted = adanorm.revert(copy.deepcopy(fused))
    assert reverted.state_dict().keys() == native.state_dict().keys()
    assert not any(module._state_dict_hooks or module._load_state_dict_pre_hooks for module in reverted.modules())


def test_fused_dynunet_keeps_its_state_dict_and_pickles_whole():
    torch.manual_seed(0)
    unfused = adanorm.convert(dynunet(True))
    fused = adanorm.convert(dynunet(True), fuse_activation=True)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), fused.eval()(x))


def test_sequential_rules_dropout_relu_and_inplace():
    model = nn.Sequential(
        nn.Conv3d(1, 8, 3), nn.BatchNorm3d(8), nn.Dropout3d(0.2), nn.LeakyReLU(0.1),  # fused across dropout
        nn.Conv3d(8, 8, 3), nn.BatchNorm3d(8), nn.Dropout3d(0.2), nn.ELU(),  # ELU does not commute with dropout
        nn.Conv3d(8, 8, 3), nn.InstanceNorm3d(8, affine=True), nn.ReLU(),  # ReLU cannot be inverted
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = adanorm.convert(model, fuse_activation=True)
    assert [type(m).__name__ for m in fused] == [
        "Conv3d", "AdaptiveNormAct3d", "Dropout3d", "FusedActivationSlot",
        "Conv3d", "AdaptiveNorm3d", "Dropout3d", "ELU",
        "Conv3d", "AdaptiveNorm3d", "ReLU"]
    messages = [str(w.message) for w in caught if "ReLU" in str(w.message)]
    assert len(messages) == 1 and "1 norm → ReLU pair(s) left unfused" in messages[0]
    assert fused[1].inplace, "fed by the convolution before it in the same Sequential"
    first = adanorm.convert(nn.Sequential(nn.BatchNorm3d(8), nn.LeakyReLU()), fuse_activation=True)
    assert not first[0].inplace, "its input comes from outside the Sequential, where others may read it"
    assert isinstance(first[1], FusedActivationSlot)


def test_fusing_is_optional_and_revert_restores_each_activation_in_its_place():
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.GroupNorm(2, 4), nn.PReLU(4), nn.Conv3d(4, 4, 3), nn.BatchNorm3d(4),
                          nn.LeakyReLU(0.3))
    assert not any(isinstance(m, adanorm.AdaptiveNormAct) for m in adanorm.convert(copy.deepcopy(model)).modules())
    reverted = adanorm.revert(adanorm.convert(copy.deepcopy(model), fuse_activation=True))
    assert str(reverted) == str(model)


@pytest.mark.parametrize("fuse_activation", [False, True], ids=["converted", "fused"])
def test_a_norm_held_under_two_names_stays_one_layer(fuse_activation):
    """nnU-Net's blocks hold their norm as ``.norm`` and inside ``.all_modules``: one layer, whose state dict
    entries under both names stay equal after training, through convert and revert."""
    model = adanorm.convert(nnunet("PlainConvUNet"), fuse_activation=fuse_activation)
    block = model.encoder.stages[0][0].convs[0]
    assert block.norm is block.all_modules[1]
    with torch.no_grad():
        block.norm.weight.add_(0.5)
    state = model.state_dict()
    prefix = "encoder.stages.0.0.convs.0."
    torch.testing.assert_close(state[prefix + "norm.weight"], state[prefix + "all_modules.1.weight"])
    reverted = adanorm.revert(model)
    block = reverted.encoder.stages[0][0].convs[0]
    assert block.norm is block.all_modules[1] and isinstance(block.norm, nn.InstanceNorm3d)
    torch.testing.assert_close(block.norm.weight, state[prefix + "norm.weight"])
