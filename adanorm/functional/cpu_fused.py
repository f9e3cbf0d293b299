"""Fused CPU backend: every training-statistics mode in two memory passes per direction, in either layout.

Native CPU kernels pay for layout and generality: ``instance_norm`` copies channels_last_3d input
to contiguous and back, channels-last ``group_norm`` parallelizes over groups (starved with one
group per channel), is slow backward and loses float32 precision at large means, and
``batch_norm`` makes extra passes for its statistics. The compiled kernels (``csrc/norm_cpu_kernels.cpp``)
run every mode as the same three steps, mirroring the Triton backend:

1. one read pass: shifted per-(sample, channel) sums;
2. pooling those (N, C) tables over the mode's set (the channels of a group, or the samples for
   batch mode) with Chan's formula, and folding γ, β into a per-(n, c) scale and shift;
3. one read+write pass: ``y = scale·x + shift`` in the input's own layout.

Backward is the same shape: Σdy and Σdy·(x−μ) in one pass, then dx = A·dy + B·x + C in one pass.

The functions below call the operators (``cpu_ops``) the way the native functions are called, for
eager code, where ``dispatch`` picked them: each requires ``dispatch.cpu_kernels()`` to have loaded
the operators. Captured code (dynamo cannot trace the build) calls ``torch.ops.adanorm.fused_norm`` /
``native_group_norm`` directly, arguments in schema order: input, weight, bias, groups, eps[,
running_mean, running_var, momentum].
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from adanorm.functional.cpu_ops import operators

__all__ = ["fused_norm", "blend_running_stats", "native_group_norm"]


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
    in place when given. Output keeps the input's layout. Call only where ``dispatch.prefer_fused_cpu``.
    """
    groups = 0 if num_groups is None else num_groups
    return operators().fused_norm(input, weight, bias, groups, eps, running_mean, running_var, momentum)


def blend_running_stats(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
                        factor: Union[float, Tensor], nonfinite_skips: Optional[Tensor]) -> None:
    """``running_stats.blend`` as one operator call: its tensor operations cost several times a small
    layer's kernel on the CPU. Call only on contiguous CPU statistics."""
    tensor_factor = factor if isinstance(factor, Tensor) else None
    operators().blend_running_stats(running_mean, running_var, batch_mean, batch_var,
                                    0.0 if tensor_factor is not None else factor, tensor_factor, nonfinite_skips)


def native_group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float) -> Tensor:
    """``torch.group_norm`` (its kernels and numbers) with a backward that always computes the input
    gradient, so that the channels-last backward of torch before 2.14 cannot crash. Under ``torch.compile`` call
    ``torch.ops.adanorm.native_group_norm``."""
    return operators().native_group_norm(input, weight, bias, num_groups, eps)
