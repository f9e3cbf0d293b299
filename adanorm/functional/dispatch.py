"""The one place that maps (device, mode, memory layout, size) to a kernel, as PyTorch picks backends below ``F.*``.

Kernels, in order of preference:

* captured code (``torch.compile``, ``torch.export``, ``torch.jit.trace``, ONNX export): PyTorch's
  native norm ops, which inductor fuses with their neighbours and every exporter carries; instance
  mode as ``instance_norm``, so no group count is read from a traced shape;
* CUDA: the Triton kernels (``triton_norm``) where ``prefer_triton`` says they beat the native ones;
* CPU: the compiled kernels (``cpu_fused``) where ``prefer_fused_cpu`` says they repay their fixed
  cost; channels-last instance mode without them: a per-sample batch-norm kernel that keeps the
  layout (``instance_channels_last``);
* otherwise native group norm, kept away from the CPU backward that crashes before torch 2.14
  (``_group_norm``, and ``_captured_group_norm`` where only native ops may run).

Running statistics are blended (``blend_kernel``) by one compiled operator on the CPU in eager
mode, by tensor operations elsewhere.

Every rule is here: the order of the kernels, their size thresholds, and the environment switches
(``ADANORM_CPU_KERNEL``, ``ADANORM_BUILD_WAIT``, ``ADANORM_TRITON``), which the kernel modules never
read themselves.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from adanorm.functional import cpu_fused, cpu_ops
from adanorm.functional.instance_channels_last import channels_last_instance_norm
from adanorm.functional.layout import KERNEL_DTYPES, is_channels_last, native_memory_format
from adanorm.functional.running_stats import blend

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
    the dynamo exporter with ``torch.export``. (``torch.onnx.is_in_onnx_export`` costs more per call
    than this function, called on every forward, may.)"""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


DEFAULT_BUILD_WAIT_S = 600.0
"""Seconds a process waits for another process's build of the CPU kernels before it keeps the native
kernels (``ADANORM_BUILD_WAIT`` overrides): several builds' time, so that only a hung or stopped build
runs it out."""


@lru_cache(maxsize=None)
def cpu_kernels() -> Optional[ModuleType]:
    """The compiled CPU operators (``cpu_ops.operators()``), compiled and loaded on the first call; None
    where ``ADANORM_CPU_KERNEL=0`` turns them off or they cannot be built (a warning says what to do).
    The switches are read on the first call: every layer call asks, and later ones answer from the cache."""
    if os.environ.get("ADANORM_CPU_KERNEL", "1") == "0":
        return None
    return cpu_ops.load(build_wait_s=_build_wait_s())


def _build_wait_s() -> float:
    """``ADANORM_BUILD_WAIT``, or the default (with a warning naming the variable) where it is no number."""
    value = os.environ.get("ADANORM_BUILD_WAIT")
    if value is None:
        return DEFAULT_BUILD_WAIT_S
    try:
        return float(value)
    except ValueError:
        warnings.warn(f"adanorm: ADANORM_BUILD_WAIT={value!r} is not a number of seconds; waiting the default "
                      f"{DEFAULT_BUILD_WAIT_S:g} s for another process's build. Set it to a number such as 600.",
                      RuntimeWarning, stacklevel=4)
        return DEFAULT_BUILD_WAIT_S


# Smallest inputs for which the compiled CPU kernels beat the native ones; below them the native
# kernels' lower fixed cost per call wins. The measurements, and how to repeat them
# (``python -m benchmarks.thresholds``), are in BENCHMARKS.md, "What makes it fast" (Dispatch).
MIN_NUMEL_BATCH = 1 << 14
# Channels-last per-sample modes: native instance and group norm copy the layout or starve threads.
MIN_NUMEL_PER_SAMPLE_CHANNELS_LAST = 1 << 12
# Channels-last layer mode (one group): below this, native group norm's channels-last kernel with one
# group has the lower cost.
MIN_NUMEL_LAYER_CHANNELS_LAST = 1 << 17
# Contiguous per-sample modes compete with native group norm, which makes two cache-local passes per
# (sample, group) pair as the compiled kernels do: these win from here on cheaper sums and a backward
# that reuses a pair while it is in cache,
MIN_NUMEL_PER_SAMPLE_CONTIGUOUS = 1 << 19
# and from here where there are fewer pairs than threads, which native group norm would leave idle (it
# runs each pair on one thread).
MIN_NUMEL_PER_SAMPLE_FEW_GROUPS = 1 << 16


def prefer_fused_cpu(input: Tensor, num_groups: Optional[int]) -> bool:
    """Whether ``cpu_fused.fused_norm`` is the faster kernel for this input, with statistics per (sample, group)
    for ``num_groups`` groups (instance, group, layer) or over the batch for None (batch mode): on a
    CPU tensor of a supported dtype, outside autocast (whose dtype policy the native ops carry).
    Captured code (compile, export, tracing) never asks: it is routed to native ops first."""
    if not input.is_cpu or input.dim() < 3:  # cheapest tests first: this runs on every call of a layer
        return False
    numel = input.numel()
    if num_groups is None:
        # More than one value per channel, or native batch norm's error must be raised instead.
        worth_it = numel >= MIN_NUMEL_BATCH and numel > input.shape[1]
    elif is_channels_last(input):
        worth_it = numel >= (MIN_NUMEL_LAYER_CHANNELS_LAST if num_groups == 1 else MIN_NUMEL_PER_SAMPLE_CHANNELS_LAST)
    else:
        worth_it = numel >= MIN_NUMEL_PER_SAMPLE_CONTIGUOUS or (
            numel >= MIN_NUMEL_PER_SAMPLE_FEW_GROUPS and input.shape[0] * num_groups < torch.get_num_threads())
    return (
        worth_it
        and input.dtype in KERNEL_DTYPES
        and not torch.is_autocast_enabled("cpu")
        and cpu_kernels() is not None
    )


def norm_activation_backend(input: Tensor) -> str:
    """Which kernels run a fused norm + activation step (``norm_act``) on ``input``: "cpu" (the compiled
    operator ``adanorm::norm_activation``: every CPU input outside autocast, since the step is one call either way and no size favours the
    tensor operations), "triton" (CUDA input where triton imports, unless ``ADANORM_TRITON=0``; any input
    ``triton_norm.triton_available`` takes with ``ADANORM_TRITON=1``, which is how the interpreter tests run),
    else "tensor_ops" (the same algebra as tensor operations)."""
    switch = os.environ.get("ADANORM_TRITON", "")
    if switch == "1" or (input.is_cuda and switch != "0"):
        from adanorm.functional import triton_norm

        if triton_norm.triton_available(input):
            return "triton"
    if input.is_cpu and not torch.is_autocast_enabled("cpu") and cpu_kernels() is not None:
        return "cpu"
    return "tensor_ops"


def prefer_triton(input: Tensor, batch_statistics: bool = False) -> bool:
    """Whether the Triton kernels (``triton_norm``) take this CUDA input: where native kernels are known
    to pay extra passes.

    Native CUDA group/instance norm copies channels-last input to contiguous and returns a
    contiguous output, which the next channels-last convolution copies back; the Triton kernels
    read and write channels-last in place. Native CUDA batch norm has channels-last kernels of its
    own, so batch statistics, like contiguous input, keep the native kernels unless
    ``ADANORM_TRITON=1`` (no GPU measurement says Triton wins there); ``ADANORM_TRITON=0`` turns the
    backend off.
    """
    switch = os.environ.get("ADANORM_TRITON", "")
    if switch == "0" or not input.is_cuda:
        return False
    from adanorm.functional import triton_norm  # imported on the first CUDA call: triton is slow to import

    if not triton_norm.triton_available(input):
        return False
    return switch == "1" or (not batch_statistics and is_channels_last(input))


def batch_kernel(input: Tensor, captured: bool) -> BatchKernel:
    """The kernel for batch statistics of ``input`` in training (``captured``: what ``capturing()`` says,
    asked once per call by the caller)."""
    if not captured:
        if input.is_cuda:
            if prefer_triton(input, batch_statistics=True):
                return _triton_batch_norm
        elif prefer_fused_cpu(input, num_groups=None):
            return _fused_batch_norm
    return _native_batch_norm


def grouped_kernel(input: Tensor, num_groups: int, captured: bool) -> GroupedKernel:
    """The kernel for per-(sample, group) statistics of ``input`` (instance mode when ``num_groups`` is C;
    ``captured``: what ``capturing()`` says)."""
    instance = num_groups == input.shape[1]
    if captured:
        return _native_instance_norm if instance else _captured_group_norm
    if input.is_cuda:
        if prefer_triton(input, batch_statistics=False):
            from adanorm.functional import triton_norm

            return triton_norm.triton_grouped_norm
    elif prefer_fused_cpu(input, num_groups):
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
            and cpu_kernels() is not None):
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
    """A scale of ones where only a shift is given: before torch 2.14 group norm's backward raises "tensor
    does not have a device" for a shift without a scale. Multiplying by one changes no bit of either direction."""
    if weight is None and bias is not None:
        return torch.ones_like(bias)
    return weight


def _channels_last_instance_norm(input, num_groups, weight, bias, eps):
    return channels_last_instance_norm(input, weight, bias, eps)


def _group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """``torch.group_norm``, kept away from the backward that crashes the process before torch 2.14.

    Its CPU channels-last backward kernel (also reached by strided views of channels-last tensors)
    segfaults when γ or β wants a gradient and the input does not: a frozen input, or
    ``torch.autograd.grad`` over parameters only. Where the compiled kernels are built, their
    ``native_group_norm`` runs the same native kernels but always asks for the input gradient.
    ``_compat.NATIVE_GROUP_NORM_BACKWARD_FIXED`` says which torch has the fix; the detour gives the same
    numbers there, so it runs on every torch pyproject.toml admits.
    """
    if not input.is_contiguous() and input.is_cpu and cpu_kernels() is not None:
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
