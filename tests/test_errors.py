"""Bad input gets an error that names the problem and the fix."""
import pytest
import torch

import adanorm


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"eps": -1e-5}, ValueError, "eps=-1e-05 is invalid.*non-negative"),
        ({"eps": float("nan")}, ValueError, "eps=nan"),
        ({"momentum": 1.5}, ValueError, r"momentum=1.5 is invalid.*\[0, 1\]"),
        ({"momentum": -0.1}, ValueError, "momentum=-0.1"),
        ({"num_groups": 3}, ValueError, "num_groups=3 does not divide num_features=8.*choose one of"),
        ({"num_groups": 0}, ValueError, "num_groups=0 is invalid"),
        ({"preset": "fast"}, ValueError, "preset='fast' is unknown; choose one of"),
        ({"preset": "small_batch", "momentum": 0.3}, ValueError, "conflicts with preset"),
        ({"mode": "batchnorm"}, ValueError, "mode='batchnorm' is unknown; choose one of"),
        ({"policy": {"min_batch_size": 2}}, TypeError, "adanorm.Policy"),
    ],
)
def test_invalid_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        adanorm.AdaptiveNorm3d(8, **kwargs)


def test_invalid_num_features():
    with pytest.raises(ValueError, match="num_features=0 is invalid"):
        adanorm.AdaptiveNorm3d(0)


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"expected 8 channels.*\(2, 4, 3, 3, 3\).*previous layer"):
        adanorm.AdaptiveNorm3d(8)(torch.randn(2, 4, 3, 3, 3))


@pytest.mark.parametrize(
    "cls,shape",
    [(adanorm.AdaptiveNorm3d, (2, 8, 3, 3)), (adanorm.AdaptiveNorm2d, (2, 8, 3, 3, 3)), (adanorm.AdaptiveNorm1d, (2, 8, 3, 3))],
)
def test_wrong_number_of_dimensions(cls, shape):
    with pytest.raises(ValueError, match=f"expects .* input, got {len(shape)}-D input"):
        cls(8)(torch.randn(shape))


def test_unbatched_input_names_the_fix():
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        adanorm.AdaptiveNorm3d(8)(torch.randn(8, 3, 3, 3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_input(dtype):
    with pytest.raises(TypeError, match=r"needs floating point.*\.float\(\)"):
        adanorm.AdaptiveNorm3d(2)(torch.ones(2, 2, 2, 2, 2, dtype=dtype))


def test_forced_mode_on_unsupported_shape():
    with pytest.raises(ValueError, match=r"mode='instance'.*\(2, 8, 1, 1, 1\).*single value.*mode='auto'"):
        adanorm.AdaptiveNorm3d(8, mode="instance")(torch.randn(2, 8, 1, 1, 1))


@pytest.mark.parametrize(
    "mode,shape", [("batch", (1, 8, 1, 1, 1)), ("instance", (2, 8, 1, 1, 1)), ("group", (2, 4, 1, 1)), ("layer", (3, 1, 1))]
)
def test_functional_core_refuses_single_value_statistics(mode, shape):
    """The core calls the aten kernels directly, so it must still raise where F.batch_norm/F.group_norm
    would, instead of returning β for every value."""
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    with pytest.raises(ValueError, match=r"single value.*mode='auto'"):
        adanorm.functional.adaptive_norm(torch.randn(shape), mode, weight, bias, training=True, num_groups=4)
    empty = torch.randn((0,) + shape[1:])
    assert adanorm.functional.adaptive_norm(empty, mode, weight, bias, training=True, num_groups=4).shape == empty.shape


@pytest.mark.parametrize("input_dtype, parameter_dtype", [
    (torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
])
def test_dtypes_native_norms_reject_get_an_error_that_names_them(input_dtype, parameter_dtype):
    with pytest.raises(RuntimeError):  # what the native layer does with these dtypes
        torch.nn.BatchNorm3d(4, dtype=parameter_dtype)(torch.randn(2, 4, 2, 2, 2, dtype=input_dtype))
    layer = adanorm.AdaptiveNorm3d(4, dtype=parameter_dtype)
    for mode_layer in (layer, adanorm.AdaptiveNorm3d(4, mode="identity", dtype=parameter_dtype)):
        with pytest.raises(TypeError, match=rf"input is {input_dtype} but the layer's parameters are {parameter_dtype}.*autocast"):
            mode_layer(torch.randn(2, 4, 2, 2, 2, dtype=input_dtype))
