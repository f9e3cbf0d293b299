"""Stateless normalization core: every mode of the adaptive layers runs through ``adaptive_norm``.

Each mode maps to one fused statistics+affine kernel, picked per memory layout, so no mode
is ever a chain of Python-level elementwise ops and channels_last_3d input stays channels_last_3d.
Modules own the parameters and running statistics and pass them in.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

from adanorm.functional import cpu_fused
from adanorm.functional.cpu_fused import fused_norm, native_group_norm, prefer_fused_cpu
from adanorm.functional.instance_channels_last import channels_last_instance_norm
from adanorm.functional.layout import is_channels_last, native_memory_format

__all__ = ["adaptive_norm", "batch_norm", "grouped_norm", "affine_only", "groups_for_mode"]


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    use_batch_stats: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """Statistics over (N, *spatial) per channel; updates running stats when they are given and used."""
    if use_batch_stats:
        _require_several_values(input, input.shape[1], "batch", "the batch size or the patch size")
        triton = _triton_backend(input, batch_statistics=True)
        if triton is not None:
            return triton.triton_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps)
        if prefer_fused_cpu(input, num_groups=None):
            return fused_norm(input, None, weight, bias, eps, running_mean, running_var, momentum)
    return torch.batch_norm(
        input, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, torch.backends.cudnn.enabled
    )


def grouped_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Per-sample statistics over (C/G)·spatial values: instance (G=C), group, and layer (G=1) modes.

    On the CPU the compiled two-pass kernels (``cpu_fused``) take every input big enough to repay
    their fixed cost: native channels-last group norm is slow backward and imprecise at large
    means, native instance norm copies channels-last input twice, and on contiguous input they
    beat native group norm's cache-local passes with cheaper sums. Small contiguous inputs stay on
    native group norm (faster than native instance norm). Without a compiler, a per-sample
    batch-norm kernel still spares instance mode the layout copies of native instance norm. On
    CUDA, Triton kernels take the layouts the native kernels handle with extra copies
    (``triton_norm.prefer_triton``). An empty batch has nothing to normalize (``affine_only``).
    """
    if input.numel() == 0:
        return affine_only(input, weight, bias)
    _require_several_values(input, input.shape[0] * num_groups, "per-sample", "the patch size or num_groups")
    triton = _triton_backend(input, batch_statistics=False)
    if triton is not None:
        return triton.triton_grouped_norm(input, num_groups, weight, bias, eps)
    if prefer_fused_cpu(input, num_groups):
        return fused_norm(input, num_groups, weight, bias, eps)
    if (num_groups == input.shape[1] and input.is_cpu and is_channels_last(input)
            and not torch.compiler.is_compiling()):
        return channels_last_instance_norm(input, weight, bias, eps)  # out= slices: not traceable by dynamo
    return _group_norm(input, num_groups, weight, bias, eps)


def _group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """``torch.group_norm``, kept away from the backward that crashes the process in torch 2.13.

    Its CPU channels-last backward kernel (also reached by strided views of channels-last tensors)
    segfaults when γ or β wants a gradient and the input does not: a frozen input, or
    ``torch.autograd.grad`` over parameters only. Where the compiled kernels are built (and not
    under ``torch.compile``), their ``native_group_norm`` runs the same native kernels but always
    asks for the input gradient. Without them, an input that does not require grad is normalized
    contiguous (the numbers of native group norm on contiguous input) and the output is returned in
    the layout native group norm gives it; an input that requires grad keeps the native op as it
    is, rather than pay for copies on every training step, so ``autograd.grad`` over parameters
    alone can still crash there. ``tests/test_reliability_core.py`` has a canary that fails once
    torch fixes the kernel.
    """
    if not input.is_contiguous() and input.is_cpu:
        if not torch.compiler.is_compiling() and cpu_fused.cpu_kernels() is not None:  # dynamo cannot trace the build
            return native_group_norm(input, num_groups, weight, bias, eps)
        if (not input.requires_grad and torch.is_grad_enabled()
                and ((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))):
            output = torch.group_norm(input.contiguous(), num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
            return output.contiguous(memory_format=native_memory_format(input))
    return torch.group_norm(input, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)


def _triton_backend(input: Tensor, batch_statistics: bool) -> Optional[ModuleType]:
    """The Triton backend when it should take this input (``triton_norm.prefer_triton``), else None.
    Imported on the first CUDA call only: importing triton is slow, and optional."""
    if not input.is_cuda:
        return None
    from adanorm.functional import triton_norm

    return triton_norm if triton_norm.prefer_triton(input, batch_statistics) else None


def _require_several_values(input: Tensor, num_statistics: int, kind: str, remedy: str) -> None:
    """The one-value check of ``F.batch_norm``/``F.group_norm``, at a fraction of their per-call cost
    (the kernels above are called directly: this layer runs after every convolution). A statistic
    of one value would silently turn the output into β; empty input passes through, as natively.
    """
    if input.numel() == num_statistics and num_statistics > 0:
        raise ValueError(
            f"{kind} statistics of input of shape {tuple(input.shape)} would each be over a single value; "
            f"increase {remedy}, or use an AdaptiveNorm layer in mode='auto', which falls back instead."
        )


def _finite_update(
    normalize: Callable[[Optional[Tensor], Optional[Tensor]], Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    nonfinite_skips: Optional[Tensor],
) -> Tensor:
    """``normalize(running_mean, running_var)``, keeping the old running statistics where the update
    would turn a finite value into NaN or Inf (one bad batch would otherwise poison them for good).

    The check reads only the C-sized statistics the kernel already produced (no pass over the input)
    and decides with ``torch.where``, so it costs no host sync and stays traceable. Entries that were
    already non-finite do not count: a bad loaded buffer must not block every later update.
    """
    if nonfinite_skips is None or running_mean is None or running_var is None:
        return normalize(running_mean, running_var)
    new_mean, new_var = running_mean.clone(), running_var.clone()
    output = normalize(new_mean, new_var)
    broken = torch.cat([running_mean, running_var]).isfinite() & ~torch.cat([new_mean, new_var]).isfinite()
    skip = broken.any()
    running_mean.copy_(torch.where(skip, running_mean, new_mean))
    running_var.copy_(torch.where(skip, running_var, new_var))
    nonfinite_skips.add_(skip)
    return output


def affine_only(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """γ·x+β as one fused kernel: the identity mode, for shapes with nothing to normalize over, and
    any mode's output on an empty batch (the same empty output and zero parameter gradients as
    native norms, in the input's layout, where native group norm returns contiguous strides).

    The output has the input's dtype, as native norms give bfloat16/float16 input with float32
    parameters: computed in the promoted dtype, then rounded once.
    """
    view = (1, -1) + (1,) * (input.dim() - 2)
    if weight is not None and bias is not None:
        output = torch.addcmul(bias.view(view), input, weight.view(view))
    elif weight is not None:
        output = input * weight.view(view)
    elif bias is not None:
        output = input + bias.view(view)
    else:
        return input
    return output if output.dtype == input.dtype else output.to(input.dtype)


def groups_for_mode(mode: str, num_channels: int, num_groups: int) -> int:
    """The group count that turns the per-sample modes into one parameterized kernel."""
    return {"instance": num_channels, "group": num_groups, "layer": 1}[mode]


def adaptive_norm(
    input: Tensor,
    mode: str,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    num_groups: int = 1,
    nonfinite_skips: Optional[Tensor] = None,
) -> Tensor:
    """Normalize ``input`` (N, C, *) in ``mode``.

    ``mode`` is one of "batch", "instance", "group", "layer", "identity". Batch mode uses batch
    statistics in training or when no running statistics are given (as ``nn.BatchNorm``), and
    updates the running statistics in place in training. Instance mode given running statistics
    behaves as ``nn.InstanceNorm(track_running_stats=True)``: it updates them with the batch's
    average instance statistics in training and normalizes with them in eval. With
    ``nonfinite_skips`` (a counter), an update whose statistics are NaN or Inf is skipped and
    counted instead of written. Shape checks belong to the caller: this function assumes the
    mode is usable for the shape.
    """
    if mode == "batch":
        use_batch_stats = training or running_mean is None
        return _finite_update(
            lambda mean, var: batch_norm(input, mean, var, weight, bias, use_batch_stats, momentum, eps),
            running_mean, running_var, nonfinite_skips if use_batch_stats else None)
    if mode == "identity" or input.numel() == 0:
        return affine_only(input, weight, bias)
    if mode == "instance" and running_mean is not None:
        if training:
            _require_several_values(input, input.shape[0] * input.shape[1], "instance", "the patch size")
        return _finite_update(
            lambda mean, var: torch.instance_norm(input, weight, bias, mean, var, training, momentum, eps,
                                                  torch.backends.cudnn.enabled),
            running_mean, running_var, nonfinite_skips if training else None)
    return grouped_norm(input, groups_for_mode(mode, input.shape[1], num_groups), weight, bias, eps)
