"""A norm and an invertible activation in one step that keeps only its output for backward.

An unfused conv → norm → activation block keeps three full-size tensors alive for backward: the conv
output (saved by the norm), the pre-activation (saved by the activation) and the activation output
(saved by the next conv). The fused step keeps the last one and per-statistic vectors: backward recovers
the pre-activation z from the output by inverting the activation (``functional.activation``) and the
normalized input from z by inverting the affine map, x̂ = (z − β)/γ, the algebra of In-Place Activated
BatchNorm (Rota Bulò et al., CVPR 2018), here for batch, instance, group and layer statistics.

With ŷ = γ·x̂ + β = z, the gradient needs x̂ only where it multiplies a sum: per statistic's set S of M values,

    dx = rstd·(γ·dz − mean_S(γ·dz) − x̂·mean_S(dz·(z − β))),   dγ = Σ dz·(z − β)/γ,   dβ = Σ dz,

so γ divides one coefficient per channel, never an element. Where a channel's |γ| is small against |β|,
(z − β)/γ would amplify the rounding of z: such a step keeps its input as the native ops do, and backward
is the plain norm's (the compiled operator decides this per step; the other forms run the native ops).
Captured code (compile, export, tracing) and TorchScript run the unfused native ops.

On the CPU the step is the compiled operator ``adanorm::norm_activation`` (or ``norm_activation_``, in place),
with its autograd in C++ (``csrc/norm_cpu_ops.cpp``; a Python autograd.Function costs more per call than a small
layer's kernels): one read pass for the statistics and one read+write pass forward; backward reads the output
and dy twice and writes dx once. On CUDA the Triton kernels with the same passes
(``adanorm::triton_norm_activation``); elsewhere the same algebra as tensor operations.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from adanorm.functional import dispatch
from adanorm.functional.activation import activate, invertible, pre_activation
from adanorm.functional.api import blend_running_statistics, groups_for_mode, normalize, require_several_values, spatial_size
from adanorm.functional.renorm import RenormClip

FUSED_DTYPES = (torch.float32, torch.float64)
"""Input dtypes the fused step takes: in half precision the saved output's rounding, amplified by the
inversion, would exceed the native ops' error; such inputs keep the unfused path."""
MAX_SHIFT_PER_SCALE = 8.0
"""A channel is inverted from its output where |β| ≤ 8·|γ|: then (z − β)/γ adds at most about 9 ulps of
x̂'s scale to the normalized value's own rounding."""


def normalize_activate(input: Tensor, mode: str, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                       momentum: Union[float, Tensor], eps: float, num_groups: int, nonfinite_skips: Optional[Tensor],
                       renorm: Optional[RenormClip], captured: bool, activation: str, negative_slope: float, alpha: float,
                       prelu_weight: Optional[Tensor], inplace: bool) -> Tensor:
    """``normalize`` followed by the activation: fused where ``fusable`` says so, otherwise the two steps as
    they are. ``inplace``: the fused step may write its output into ``input``'s storage (the caller promises
    nothing else reads ``input`` afterwards, as ``nn.LeakyReLU(inplace=True)`` does for its input); the
    unfused step applies the activation in place on the norm's own output either way."""
    if fusable(input, mode, weight, bias, running_mean, training, renorm, captured, activation, negative_slope, alpha,
               prelu_weight):
        backend = dispatch.norm_activation_backend(input)
        # The compiled operator checks the affine map itself and keeps the input where it cannot be inverted;
        # the other forms check it first (one host sync on a GPU) and keep the native ops there.
        if backend == "cpu" or _affine_invertible(weight, bias):
            groups = 0 if mode == "batch" else groups_for_mode(mode, input.shape[1], num_groups)
            per_statistic = input.shape[0] if groups == 0 else input.shape[1] // groups
            require_several_values(per_statistic * spatial_size(input), input, mode, "the batch size or the patch size")
            write_into_input = inplace and _may_write_into(input)
            code, parameter = _kernel_activation(activation, negative_slope, alpha)
            if backend == "cpu":
                kernels = dispatch.cpu_kernels()
                operator = kernels.norm_activation_ if write_into_input else kernels.norm_activation
                output, batch_mean, batch_var = operator(input, weight, bias, prelu_weight, groups, eps, code, parameter,
                                                         MAX_SHIFT_PER_SCALE)
            else:
                output, batch_mean, batch_var = _FusedNormActivation.apply(
                    input, weight, bias, prelu_weight, groups, eps, activation, negative_slope, alpha, write_into_input,
                    backend)
            if running_mean is not None and running_var is not None and groups == 0:
                blend_running_statistics(running_mean, running_var, batch_mean, batch_var, momentum, nonfinite_skips,
                                         captured)
            return output
    output = normalize(input, mode, weight, bias, running_mean, running_var, training, momentum, eps, num_groups,
                       nonfinite_skips, renorm, captured)
    return activate(output, activation, negative_slope, alpha, prelu_weight, inplace=output is not input)


def fusable(input: Tensor, mode: str, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
            training: bool, renorm: Optional[RenormClip], captured: bool, activation: str, negative_slope: float,
            alpha: float, prelu_weight: Optional[Tensor]) -> bool:
    """Whether the fused step runs: a training step with the input's own statistics that autograd will
    differentiate, in eager code, on float32/float64 input, with an invertible activation. (Whether the affine
    map can be inverted as well is the kernels' check: ``normalize_activate``.)

    Everything else (eval, no grad, identity mode, renorm, instance statistics with running statistics,
    captured code, TorchScript, half precision) saves nothing a fused step would spare, or is rare enough
    to keep the native ops and their numbers."""
    if torch.jit.is_scripting() or captured or not training or renorm is not None or mode == "identity":
        return False
    if mode == "instance" and running_mean is not None:
        return False
    if not torch.is_grad_enabled() or input.numel() == 0 or input.dim() < 3 or input.dtype not in FUSED_DTYPES:
        return False
    if not (input.requires_grad or _requires_grad(weight) or _requires_grad(bias) or _requires_grad(prelu_weight)):
        return False
    return invertible(activation, negative_slope, alpha, prelu_weight)


def _requires_grad(tensor: Optional[Tensor]) -> bool:
    return tensor is not None and tensor.requires_grad


def _affine_invertible(weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Every channel's γ is a normal float and |β| ≤ ``MAX_SHIFT_PER_SCALE``·|γ| (one host sync on a GPU; the
    compiled CPU operator makes the same check, ``affine_invertible`` in csrc/norm_cpu_kernels.cpp)."""
    if weight is None:
        return True
    scale = weight.detach().abs()
    ok = scale >= torch.finfo(scale.dtype).tiny
    if bias is not None:
        ok = ok & (bias.detach().abs() <= MAX_SHIFT_PER_SCALE * scale)
    return bool(ok.all())


def _may_write_into(input: Tensor) -> bool:
    """Whether autograd lets the fused step overwrite ``input``: not a leaf that wants a gradient, not a view
    (whose base others may read), not saved for backward by another op (a saved input holds a second reference
    to the tensor, ``_use_count() > 1``: a ``x * w`` that needs ``x`` for ``w``'s gradient), and not saved by
    the node that produced it (nodes that save their own output, such as ``exp`` or ``relu``, hold it without
    that reference, but carry ``_saved_result``). Overwriting any of these would fail that node's backward."""
    if input.is_leaf and input.requires_grad:
        return False
    if input._base is not None or input._use_count() > 1:
        return False
    node = input.grad_fn
    return node is None or not hasattr(node, "_saved_result")


def _tables(input: Tensor, groups: int) -> List[int]:
    """The dimensions a statistic of ``groups`` reduces in the (N, G, C/G, *) view (groups > 0) or in
    the input itself (batch statistics, groups == 0)."""
    if groups == 0:
        return [0] + list(range(2, input.dim()))
    return list(range(2, input.dim() + 1))


def _grouped_view(tensor: Tensor, groups: int) -> Tensor:
    """(N, C, *) as (N, G, C/G, *): a view in either memory layout (one dimension split)."""
    return tensor.view([tensor.shape[0], groups, tensor.shape[1] // groups] + list(tensor.shape[2:]))


def _per_channel(values: Tensor, input: Tensor, groups: int) -> Tensor:
    """Per-statistic values, (C,) for batch statistics or (N, G) per sample, as a tensor that broadcasts
    against (N, C, *) input."""
    trailing = [1] * (input.dim() - 2)
    if groups == 0:
        return values.view([1, -1] + trailing)
    return values.repeat_interleave(input.shape[1] // groups, dim=1).view([input.shape[0], input.shape[1]] + trailing)


KERNEL_ACTIVATIONS = {"identity": 0, "leaky_relu": 1, "prelu": 1, "elu": 2}
"""The compiled operators' activation codes (``kIdentity``, ``kSlope``, ``kElu`` in norm_cpu_kernels.h)."""


def _kernel_activation(activation: str, negative_slope: float, alpha: float) -> Tuple[int, float]:
    """(code, parameter) of the compiled operators: the slope of a leaky ReLU, α of an ELU (a PReLU's slopes
    go as their tensor)."""
    return KERNEL_ACTIVATIONS[activation], alpha if activation == "elu" else negative_slope


def _prelu_weight_grad(output: Tensor, grad_output: Tensor, prelu_weight: Tensor) -> Tensor:
    """dL/dslope = Σ over y ≤ 0 of dy·z = Σ dy·min(y, 0)/slope, per channel or in all (one shared slope):
    one extra read pass, which only a PReLU with a trainable slope pays."""
    negative_part = grad_output * output.clamp(max=0)
    if prelu_weight.numel() == 1:
        return (negative_part.sum() / prelu_weight.reshape(())).reshape(prelu_weight.shape).to(prelu_weight.dtype)
    return (negative_part.sum([0] + list(range(2, output.dim()))) / prelu_weight).to(prelu_weight.dtype)


class _FusedNormActivation(torch.autograd.Function):
    """y = act(γ·(x − μ)·rstd + β) on the Triton kernels or as tensor operations (``backend``), saving y, γ, β,
    the PReLU slopes and rstd; ``groups`` 0 for batch statistics. Also returns the batch mean and unbiased
    variance (batch statistics) for the running statistics, as non-differentiable outputs. The compiled CPU
    operator ``adanorm::norm_activation`` is the same step with its autograd in C++."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], prelu_weight: Optional[Tensor],
                groups: int, eps: float, activation: str, negative_slope: float, alpha: float, write_into_input: bool,
                backend: str) -> Tuple[Tensor, Tensor, Tensor]:
        ctx.backend = backend
        ctx.groups, ctx.activation, ctx.negative_slope, ctx.alpha = groups, activation, negative_slope, alpha
        if backend == "triton":
            # The kernels read the activation's parameter per channel: built once, read by both directions.
            ctx.code, parameter = _kernel_activation(activation, negative_slope, alpha)
            parameters = _parameter_vector(input, activation, parameter, prelu_weight)
            output, rstd, mean, unbiased_var, in_place = _forward_triton(input, weight, bias, groups, eps, ctx.code,
                                                                         parameters, write_into_input)
        else:
            parameters = None
            output, rstd, mean, unbiased_var, in_place = _forward_tensor_ops(ctx, input, weight, bias, prelu_weight,
                                                                             groups, eps, write_into_input)
        if in_place:
            ctx.mark_dirty(input)
        ctx.mark_non_differentiable(mean, unbiased_var)
        ctx.save_for_backward(output, weight, bias, prelu_weight, rstd, parameters)
        return output, mean, unbiased_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        output, weight, bias, prelu_weight, rstd, parameters = ctx.saved_tensors
        need = ctx.needs_input_grad
        if ctx.backend == "tensor_ops":
            grads = _backward_tensor_ops(ctx, grad_output, output, weight, bias, prelu_weight, rstd)
        else:
            from adanorm.functional import triton_norm

            grad_input, grad_weight, grad_bias = triton_norm.triton_norm_activation_backward(
                grad_output, output, weight, bias, rstd, ctx.groups or None, ctx.code, parameters, need[0])
            grad_prelu = None
            if prelu_weight is not None and need[3]:
                grad_prelu = _prelu_weight_grad(output, grad_output, prelu_weight)
            grads = (grad_input if need[0] else None,
                     grad_weight.to(weight.dtype) if weight is not None and need[1] else None,
                     grad_bias.to(bias.dtype) if bias is not None and need[2] else None, grad_prelu)
        return (*grads, None, None, None, None, None, None, None)


def _parameter_vector(input: Tensor, activation: str, parameter: float, prelu_weight: Optional[Tensor]) -> Optional[Tensor]:
    """The activation's parameter per channel, as the Triton kernels read it (None for identity)."""
    if activation == "identity":
        return None
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if prelu_weight is not None:
        return prelu_weight.detach().to(dtype).expand(input.shape[1]).contiguous()
    return torch.full((input.shape[1],), parameter, dtype=dtype, device=input.device)


def _forward_triton(input, weight, bias, groups, eps, code, parameters, write_into_input):
    """The Triton kernels: (output, rstd (N, C), batch mean, unbiased batch variance, written in place); the input
    is overwritten only where it is already dense in a layout the kernels address (contiguous or channels-last)."""
    from adanorm.functional import triton_norm

    dense = triton_norm._kernel_layout(input)
    in_place = write_into_input and dense is input
    output = input if in_place else torch.empty_like(dense)
    rstd, mean, unbiased_var = triton_norm.triton_norm_activation(input, weight, bias, groups or None, eps, code,
                                                                  parameters, output)
    return output, rstd, mean.to(input.dtype), unbiased_var.to(input.dtype), in_place


def _forward_tensor_ops(ctx, input, weight, bias, prelu_weight, groups, eps, write_into_input):
    """Tensor operations (any device): rstd per statistic, (C,) or (N, G)."""
    activation = ctx.activation
    source = input if groups == 0 else _grouped_view(input, groups)
    var, mean = torch.var_mean(source, _tables(input, groups), correction=0)
    rstd = torch.rsqrt(var + eps)
    scale = _per_channel(rstd, input, groups)
    shift = -_per_channel(mean, input, groups) * scale
    if weight is not None:
        gamma = weight.view([1, -1] + [1] * (input.dim() - 2))
        scale, shift = scale * gamma, shift * gamma
    if bias is not None:
        shift = shift + bias.view([1, -1] + [1] * (input.dim() - 2))
    if write_into_input:
        output = input.mul_(scale.to(input.dtype)).add_(shift.to(input.dtype))
    else:
        output = torch.addcmul(shift.to(input.dtype), input, scale.to(input.dtype))
    output = activate(output, activation, ctx.negative_slope, ctx.alpha, prelu_weight, inplace=activation != "prelu")
    if activation == "prelu" and write_into_input:
        input.copy_(output)
        output = input
    count = source.numel() // var.numel()
    return output, rstd, mean, var * (count / max(count - 1, 1)), write_into_input


def _backward_tensor_ops(ctx, grad_output, output, weight, bias, prelu_weight, rstd):
    """(dx, dγ, dβ, dslopes) of ``_forward_tensor_ops`` from its output."""
    groups = ctx.groups
    z, grad_z, grad_prelu = pre_activation(output, grad_output, ctx.activation, ctx.negative_slope, ctx.alpha,
                                           prelu_weight)
    channel_view = [1, -1] + [1] * (output.dim() - 2)
    centered = z if bias is None else z - bias.view(channel_view)  # γ·x̂
    spatial = list(range(2, output.dim()))
    # Per (n, c) sums over the positions: Σdz and Σdz·(z − β).
    sum_dz = grad_z.sum(spatial) if spatial else grad_z
    sum_dz_centered = (grad_z * centered).sum(spatial) if spatial else grad_z * centered
    gamma = None if weight is None else weight.to(sum_dz.dtype)
    grad_weight = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = (sum_dz_centered.sum(0) / gamma).to(weight.dtype)
    grad_bias = sum_dz.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    grad_input = None
    if ctx.needs_input_grad[0]:
        gamma_dz = sum_dz if gamma is None else sum_dz * gamma
        if groups == 0:
            count = output.numel() // output.shape[1]
            mean_gamma_dz, mean_dz_centered = gamma_dz.sum(0) / count, sum_dz_centered.sum(0) / count
        else:
            count = output.numel() // (output.shape[0] * groups)
            mean_gamma_dz = gamma_dz.view(output.shape[0], groups, -1).sum(2) / count
            mean_dz_centered = sum_dz_centered.view(output.shape[0], groups, -1).sum(2) / count
        rstd_view = _per_channel(rstd, output, groups)
        inverse_gamma = 1.0 if gamma is None else 1.0 / gamma.view(channel_view)
        dz_scale = rstd_view if gamma is None else rstd_view * gamma.view(channel_view)
        centered_scale = -rstd_view * _per_channel(mean_dz_centered, output, groups) * inverse_gamma
        offset = -rstd_view * _per_channel(mean_gamma_dz, output, groups)
        grad_input = torch.addcmul(offset.to(output.dtype), grad_z, dz_scale.to(output.dtype))
        grad_input.addcmul_(centered, centered_scale.to(output.dtype))
    return grad_input, grad_weight, grad_bias, grad_prelu
