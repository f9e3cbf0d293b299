"""The one place that maps (device, mode, memory layout, size) to a kernel, as PyTorch picks backends below ``F.*``.

Kernels, in order of preference:

* captured code (``torch.compile``, ``torch.export``, ``torch.jit.trace``, ONNX export): PyTorch's
  native norm ops, which inductor fuses with their neighbours and every exporter carries; instance
  mode as ``instance_norm``, so no group count is read from a traced shape;
* CUDA: the Triton kernels where ``triton_norm.prefer_triton`` says they beat the native ones;
* CPU: the compiled kernels (``cpu_fused``) where ``prefer_fused_cpu`` says they repay their fixed
  cost; channels-last instance mode without them: a per-sample batch-norm kernel that keeps the
  layout (``instance_channels_last``);
* otherwise native group norm, kept away from torch 2.13's crashing CPU backward (``_group_norm``,
  and ``_captured_group_norm`` where only native ops may run).

Running statistics are blended (``blend_kernel``) by one compiled operator on the CPU in eager
mode, by tensor operations elsewhere.

Each size rule lives with its kernel (measured thresholds in ``cpu_fused``, ``triton_norm``); the
order of the rules, and every environment switch, are read here.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from adanorm.functional import cpu_fused
from adanorm.functional.running_stats import blend
from adanorm.functional.instance_channels_last import channels_last_instance_norm
from adanorm.functional.layout import is_channels_last, native_memory_format

BatchKernel = Callable[[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], float, float], Tensor]
"""``kernel(input, weight, bias, running_mean, running_var, momentum, eps)``: batch statistics, updating the
running ones in place (``momentum`` as in ``F.batch_norm``) when they are given."""
GroupedKernel = Callable[[Tensor, int, Optional[Tensor], Optional[Tensor], float], Tensor]
"""``kernel(input, num_groups, weight, bias, eps)``: statistics per (sample, group)."""
BlendKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Union[float, Tensor], Optional[Tensor]], None]
"""``kernel(running_mean, running_var, batch_mean, batch_var, factor, nonfinite_skips)``: ``running_stats.blend``."""


def capturing() -> bool:
    """Whether a compiler, tracer or exporter is recording this call (then only native ops may run).

    ONNX export needs no check of its own: the legacy exporter records with ``torch.jit.trace`` and
    the dynamo exporter with ``torch.export``. (``torch.onnx.is_in_onnx_export`` costs 2.5 µs a call,
    which this function, called on every forward, must not.)"""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def batch_kernel(input: Tensor, captured: bool) -> BatchKernel:
    """The kernel for batch statistics of ``input`` in training (``captured``: what ``capturing()`` says,
    asked once per call by the caller)."""
    if not captured:
        if input.is_cuda:
            from adanorm.functional import triton_norm  # imported on the first CUDA call: triton is slow to import

            if triton_norm.prefer_triton(input, batch_statistics=True):
                return _triton_batch_norm
        elif cpu_fused.prefer_fused_cpu(input, num_groups=None):
            return _fused_batch_norm
    return _native_batch_norm


def grouped_kernel(input: Tensor, num_groups: int, captured: bool) -> GroupedKernel:
    """The kernel for per-(sample, group) statistics of ``input`` (instance mode when ``num_groups`` is C;
    ``captured``: what ``capturing()`` says)."""
    instance = num_groups == input.shape[1]
    if captured:
        return _native_instance_norm if instance else _captured_group_norm
    if input.is_cuda:
        from adanorm.functional import triton_norm

        if triton_norm.prefer_triton(input, batch_statistics=False):
            return triton_norm.triton_grouped_norm
    elif cpu_fused.prefer_fused_cpu(input, num_groups):
        return cpu_fused.fused_norm
    if input.is_contiguous():  # native group norm's crashing backward is its channels-last one
        return _native_group_norm
    if instance and input.is_cpu and is_channels_last(input):
        return _channels_last_instance_norm
    return _group_norm


def blend_kernel(running_mean: Tensor, running_var: Tensor, captured: bool) -> BlendKernel:
    """How batch statistics are blended into running ones: on the CPU in eager mode one compiled
    operator; elsewhere tensor operations, which compilers fuse and GPUs run without a host sync."""
    if (not captured and running_mean.is_cpu and running_mean.is_contiguous() and running_var.is_contiguous()
            and cpu_fused.cpu_kernels() is not None):
        return cpu_fused.blend_running_stats
    return blend


def _triton_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps):
    from adanorm.functional import triton_norm

    return triton_norm.triton_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps)


def _fused_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps):
    return cpu_fused.fused_norm(input, None, weight, bias, eps, running_mean, running_var, momentum)


def _native_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps):
    return torch.batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps,
                            torch.backends.cudnn.enabled)


def _native_instance_norm(input, num_groups, weight, bias, eps):
    return torch.instance_norm(input, weight, bias, None, None, True, 0.0, eps, torch.backends.cudnn.enabled)


def _native_group_norm(input, num_groups, weight, bias, eps):
    # The last argument (cudnn_enabled) is unused by at::group_norm; a constant spares reading the flag per call.
    return torch.group_norm(input, num_groups, _scale_beside_shift(weight, bias), bias, eps, True)


def _scale_beside_shift(weight: Optional[Tensor], bias: Optional[Tensor]) -> Optional[Tensor]:
    """A scale of ones where only a shift is given: torch 2.13's group norm backward raises "tensor does
    not have a device" for a shift without a scale. Multiplying by one changes no bit of either direction."""
    if weight is None and bias is not None:
        return torch.ones_like(bias)
    return weight


def _channels_last_instance_norm(input, num_groups, weight, bias, eps):
    return channels_last_instance_norm(input, weight, bias, eps)


def _group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """``torch.group_norm``, kept away from the backward that crashes the process in torch 2.13.

    Its CPU channels-last backward kernel (also reached by strided views of channels-last tensors)
    segfaults when γ or β wants a gradient and the input does not: a frozen input, or
    ``torch.autograd.grad`` over parameters only. Where the compiled kernels are built, their
    ``native_group_norm`` runs the same native kernels but always asks for the input gradient.
    ``tests/test_reliability_core.py`` has a canary that fails once torch fixes the kernel.
    """
    if not input.is_contiguous() and input.is_cpu and cpu_fused.cpu_kernels() is not None:
        return cpu_fused.native_group_norm(input, num_groups, _scale_beside_shift(weight, bias), bias, eps)
    return _captured_group_norm(input, num_groups, weight, bias, eps)


def _captured_group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float) -> Tensor:
    """Native group norm with native ops only: a frozen channels-last input is normalized contiguous
    (the numbers of native group norm on contiguous input) and returned in the layout native group
    norm gives it. An input that requires grad keeps the native op as it is, rather than pay for
    copies on every training step, so ``autograd.grad`` over parameters alone can still crash here."""
    if (not input.is_contiguous() and input.is_cpu and not input.requires_grad and torch.is_grad_enabled()
            and ((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))):
        output = _native_group_norm(input.contiguous(), num_groups, weight, bias, eps)
        return output.contiguous(memory_format=native_memory_format(input))
    return _native_group_norm(input, num_groups, weight, bias, eps)
