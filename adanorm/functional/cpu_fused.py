"""Fused CPU backend: every training-statistics mode in two memory passes per direction, in either layout.

Native CPU kernels pay for layout and generality: ``instance_norm`` copies channels_last_3d input
to contiguous and back, channels-last ``group_norm`` parallelizes over groups (starved with one
group per channel) and loses float32 precision at large means, and ``batch_norm`` makes extra
passes for its statistics. Here every mode is the same three steps, mirroring the Triton backend:

1. one read pass: shifted per-(sample, channel) sums (``channel_sums`` in ``csrc/norm_cpu.cpp``);
2. pooling those (N, C) tables over the mode's set — channels of a group, or samples for batch
   mode — with Chan's formula, and folding γ, β into a per-(n, c) scale and shift (tiny tensors);
3. one read+write pass: ``y = scale·x + shift`` in the input's own layout (``channel_affine``).

Backward is the same shape: Σdy and Σdy·(x−μ) in one pass, then dx = A·dy + B·x + C in one pass.

The C++ source compiles once per machine on first use (``torch.utils.cpp_extension``, about
40 s, cached under ``TORCH_EXTENSIONS_DIR``). Without a compiler, or with
``ADANORM_CPU_KERNEL=0``, callers keep the native kernels.
"""
from __future__ import annotations

import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from adanorm.functional.layout import is_channels_last

__all__ = ["cpu_kernels", "prefer_fused_cpu", "fused_norm"]

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "norm_cpu.cpp"
_EXTENSION = "adanorm_norm_cpu"
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Smallest inputs worth the fused kernels, measured on a 2-core x86 CPU with benchmarks/norms.py:
# below these, the native kernels' lower fixed cost per call wins. Contiguous per-sample modes stay
# native at every size: native group norm already makes two cache-local passes per group there.
MIN_NUMEL_BATCH = 1 << 18
MIN_NUMEL_PER_SAMPLE_CHANNELS_LAST = 1 << 12


@lru_cache(maxsize=None)
def cpu_kernels() -> Optional[ModuleType]:
    """The compiled kernels, or None (disabled, or no toolchain: a warning says how to get them)."""
    if os.environ.get("ADANORM_CPU_KERNEL", "1") == "0":
        return None
    from torch.utils import cpp_extension

    if not _is_built(cpp_extension):
        print("adanorm: compiling its CPU kernels (once per machine and torch version, about a minute)...",
              file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(name=_EXTENSION, sources=[str(_SOURCE)],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
    except Exception as error:  # no compiler or ninja: native kernels still give the same numbers
        warnings.warn(
            f"adanorm: could not compile its CPU kernels ({type(error).__name__}: {error}); using PyTorch's "
            "native norm kernels, which are slower on channels_last_3d input. Install a C++ compiler and "
            "`pip install ninja` to enable them, or set ADANORM_CPU_KERNEL=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _is_built(cpp_extension: ModuleType) -> bool:
    """Whether a build is cached (then loading is quick and needs no notice)."""
    try:
        build_directory = Path(cpp_extension._get_build_directory(_EXTENSION, verbose=False))
    except Exception:  # a private helper: if it moves, only the notice is lost
        return True
    return (build_directory / f"{_EXTENSION}.so").exists()


def prefer_fused_cpu(input: Tensor, batch_statistics: bool) -> bool:
    """Whether ``fused_norm`` is the faster kernel for this input: batch statistics (batch mode) or
    per-sample ones (instance, group, layer), on a CPU tensor of a supported dtype, outside autocast
    (whose dtype policy the native ops carry)."""
    if input.device.type != "cpu" or input.dtype not in _SUPPORTED_DTYPES or input.dim() < 3:
        return False
    if batch_statistics:
        # More than one value per channel, or native batch norm's error must be raised instead.
        worth_it = input.numel() >= MIN_NUMEL_BATCH and input.numel() > input.shape[1]
    else:
        worth_it = input.numel() >= MIN_NUMEL_PER_SAMPLE_CHANNELS_LAST and is_channels_last(input)
    return worth_it and not torch.is_autocast_enabled("cpu") and cpu_kernels() is not None


def _layout(input: Tensor) -> Tuple[Tensor, bool]:
    """The input made dense in its own layout (a no-op for conv outputs), and whether that is channels-last."""
    if is_channels_last(input):
        return input, True
    return input.contiguous(), False


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                num_groups: Optional[int], eps: float, running_mean: Optional[Tensor],
                running_var: Optional[Tensor], momentum: float) -> Tensor:
        x, channels_last = _layout(input)
        groups = 0 if num_groups is None else num_groups
        output, mean, rstd = cpu_kernels().norm_forward(
            x, weight, bias, groups, eps, running_mean, running_var, momentum, channels_last
        )
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.groups, ctx.eps = groups, eps
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight, bias, mean, rstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_output, input, weight, bias)
        x, channels_last = _layout(input)
        memory_format = _memory_format(x) if channels_last else torch.contiguous_format
        grad_input, grad_weight, grad_bias = cpu_kernels().norm_backward(
            grad_output.contiguous(memory_format=memory_format), x, weight, mean, rstd, ctx.groups,
            channels_last, need_input,
        )
        return (
            grad_input if need_input else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None, None, None, None, None,
        )


def _differentiable_backward(ctx, grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor]):
    """Gradients that are themselves differentiable (``create_graph=True``, e.g. gradient penalties):
    recomputed through the native kernels, which PyTorch can differentiate twice."""
    with torch.enable_grad():
        if ctx.groups == 0:
            output = F.batch_norm(input, None, None, weight, bias, True, 0.0, ctx.eps)
        else:
            output = F.group_norm(input, ctx.groups, weight, bias, ctx.eps)
        wanted = [t for t, need in zip((input, weight, bias), ctx.needs_input_grad[:3]) if need]
        grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3]) + (None,) * 5


def _memory_format(input: Tensor) -> torch.memory_format:
    return torch.channels_last_3d if input.dim() == 5 else torch.channels_last


def fused_norm(
    input: Tensor,
    num_groups: Optional[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
) -> Tensor:
    """Normalize with statistics of the current input: per (sample, group) for ``num_groups`` groups,
    or per channel over the batch (``num_groups=None``, batch mode), updating running statistics
    in place when given. Output keeps the input's layout. Call only where ``prefer_fused_cpu``.
    """
    return _FusedNorm.apply(input, weight, bias, num_groups, eps, running_mean, running_var, momentum)

