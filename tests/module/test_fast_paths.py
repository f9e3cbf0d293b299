"""Every CPU fast path of adanorm.functional equals the native module, in each layout and dtype.

The fast paths (group norm for instance mode in contiguous layout, the per-sample batch-norm
kernel for instance mode in channels-last layout, the native kernels elsewhere) are picked by
mode and memory format, so small shapes reach every one of them; the tests compare output,
input/weight/bias gradients and the output's memory format with the native
module of the same mode. Tolerances: those of the core tests for float32/float64, a looser one
for bfloat16 (the native kernels round differently there).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from adanorm import AdaptiveNorm2d, AdaptiveNorm3d
from adanorm.functional import adaptive_norm, grouped_norm
from adanorm.functional.instance_channels_last import channels_last_instance_norm

# Every test here runs on the native CPU kernels and again on the compiled fused ones (conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_backend")

TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-4), torch.bfloat16: (6e-2, 3e-2)}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": None}  # None: channels_last(_3d) by rank
SHAPES = {5: [(2, 6, 3, 4, 5), (1, 8, 4, 4, 4)], 4: [(2, 6, 5, 7), (1, 8, 4, 4)]}


def _format(layout: str, dim: int) -> torch.memory_format:
    if layout == "contiguous":
        return torch.contiguous_format
    return torch.channels_last_3d if dim == 5 else torch.channels_last


def native(mode: str, channels: int, dim: int, num_groups: int) -> nn.Module:
    if mode == "batch":
        return (nn.BatchNorm3d if dim == 5 else nn.BatchNorm2d)(channels)
    if mode == "instance":
        return (nn.InstanceNorm3d if dim == 5 else nn.InstanceNorm2d)(channels, affine=True)
    return nn.GroupNorm(num_groups if mode == "group" else 1, channels)


def _inputs(shape, dtype, layout, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 3).to(dtype)
    x = x.contiguous(memory_format=_format(layout, len(shape)))
    dy = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).contiguous(memory_format=_format(layout, len(shape)))
    return x, dy


def _randomize(*modules, dtype):
    for module in modules:
        generator = torch.Generator().manual_seed(1)
        module.to(dtype)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64) + 0.5)


def _step(module, x, dy):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return y, x.grad


def assert_matches_native(mode, shape, dtype, layout, num_groups=2):
    channels, dim = shape[1], len(shape)
    adaptive = (AdaptiveNorm3d if dim == 5 else AdaptiveNorm2d)(channels, mode=mode, num_groups=num_groups if mode == "group" else None)
    reference = native(mode, channels, dim, adaptive.num_groups)
    _randomize(adaptive, reference, dtype=dtype)
    x, dy = _inputs(shape, dtype, layout)
    y, dx = _step(adaptive, x, dy)
    if mode == "instance":
        # torch 2.13's nn.InstanceNorm returns wrong input gradients for channels-last input with
        # N=1 (test_native_instance_norm_channels_last_bug): compare with it on contiguous input.
        y_ref, dx_ref = _step(reference, x.contiguous(), dy.contiguous())
    else:
        y_ref, dx_ref = _step(reference, x, dy)
    atol, rtol = TOL[dtype]
    fmt = _format(layout, dim)
    assert y.dtype == dtype and dx.dtype == dtype
    assert y.is_contiguous(memory_format=fmt), f"{mode} output left {layout}"
    assert dx.is_contiguous(memory_format=fmt), f"{mode} grad_input left {layout}"
    torch.testing.assert_close(y, y_ref.contiguous(memory_format=fmt), atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, dx_ref.contiguous(memory_format=fmt), atol=atol, rtol=rtol)
    for name in ("weight", "bias"):
        grad, grad_ref = getattr(adaptive, name).grad, getattr(reference, name).grad
        scale = grad_ref.abs().max().item() + 1  # sums over many values: compare relative to magnitude
        torch.testing.assert_close(grad, grad_ref, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["batch", "instance", "group", "layer"])
@pytest.mark.parametrize("dim", [5, 4])
def test_every_mode_equals_native(mode, layout, dtype, dim):
    for shape in SHAPES[dim]:
        assert_matches_native(mode, shape, dtype, layout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_channels_last_instance_function(dtype, affine):
    x, dy = _inputs((3, 5, 3, 4, 2), dtype, "channels_last")
    weight = (torch.rand(5, dtype=torch.float64) + 0.5).to(dtype).requires_grad_(True) if affine else None
    bias = torch.randn(5, dtype=torch.float64).to(dtype).requires_grad_(True) if affine else None
    xa = x.detach().requires_grad_(True)
    xr = x.detach().requires_grad_(True)
    y = channels_last_instance_norm(xa, weight, bias, 1e-5)
    y.backward(dy)
    grads = (xa.grad,) + ((weight.grad, bias.grad) if affine else ())
    if affine:
        weight.grad = bias.grad = None
    y_ref = torch.nn.functional.group_norm(xr, 5, weight, bias, 1e-5)
    y_ref.backward(dy)
    grads_ref = (xr.grad,) + ((weight.grad, bias.grad) if affine else ())
    atol, rtol = TOL[dtype]
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, y_ref.contiguous(memory_format=torch.channels_last_3d), atol=atol, rtol=rtol)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=atol * (grad_ref.abs().max().item() + 1), rtol=rtol)


def test_mixed_precision_parameters():
    """bfloat16 activations with float32 parameters (as under CPU autocast) on every fast path."""
    x, dy = _inputs((2, 4, 3, 3, 4), torch.bfloat16, "channels_last")
    weight = (torch.rand(4) + 0.5).requires_grad_(True)
    bias = torch.randn(4).requires_grad_(True)
    for groups in (4, 2, 1):
        xa = x.detach().requires_grad_(True)
        y = grouped_norm(xa, groups, weight, bias, 1e-5)
        y.backward(dy)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last_3d)
        assert xa.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
        xr = x.detach().requires_grad_(True)
        y_ref = torch.nn.functional.group_norm(xr, groups, weight, bias, 1e-5)
        torch.testing.assert_close(y, y_ref.contiguous(memory_format=torch.channels_last_3d), atol=6e-2, rtol=3e-2)
        weight.grad = bias.grad = None


def test_no_grad_and_functional_entry():
    x, _ = _inputs((2, 6, 3, 4, 5), torch.float32, "channels_last")
    weight, bias = torch.rand(6) + 0.5, torch.randn(6)
    with torch.no_grad():
        for mode, groups in (("instance", 6), ("group", 3), ("layer", 1)):
            y = adaptive_norm(x, mode, weight, bias, num_groups=groups)
            assert y.is_contiguous(memory_format=torch.channels_last_3d)
            ref = torch.nn.functional.group_norm(x, {"instance": 6, "group": 3, "layer": 1}[mode], weight, bias)
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)


def test_native_instance_norm_channels_last_bug():
    """Documents the upstream bug the instance tests step around; adanorm's path is unaffected.

    If this starts failing, PyTorch fixed nn.InstanceNorm's channels-last N=1 backward.
    """
    shape = (1, 8, 4, 4, 4)
    x, dy = _inputs(shape, torch.float64, "channels_last")
    module = nn.InstanceNorm3d(8, affine=True).double()
    _, dx_native = _step(module, x, dy)
    _, dx_contiguous = _step(module, x.contiguous(), dy.contiguous())
    _, dx_adanorm = _step(AdaptiveNorm3d(8, mode="instance").double(), x, dy)
    torch.testing.assert_close(dx_adanorm, dx_contiguous.contiguous(memory_format=torch.channels_last_3d))
    assert not torch.allclose(dx_native, dx_contiguous)
