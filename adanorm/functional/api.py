"""The public functional API: every mode of the adaptive layers runs through ``adaptive_norm``.

Modules own the parameters and running statistics and pass them in. This layer checks the one
precondition every kernel shares (more than one value per statistic), routes running-statistics
updates through ``running_stats`` (so a momentum may be a tensor and non-finite batches can be
skipped without a host sync), and leaves the choice of kernel to ``dispatch``.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor

from adanorm.functional import dispatch
from adanorm.functional.renorm import RenormClip, renormalize_batch_mode
from adanorm.functional.running_stats import scratch_statistics


def adaptive_norm(
    input: Tensor,
    mode: str,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    *,
    training: bool = False,
    momentum: Union[float, Tensor] = 0.1,
    eps: float = 1e-5,
    num_groups: int = 1,
    nonfinite_skips: Optional[Tensor] = None,
    renorm: Optional[RenormClip] = None,
) -> Tensor:
    """Normalize ``input`` (N, C, *) in ``mode``: "batch", "instance", "group", "layer" or "identity".

    Batch mode uses batch statistics in training or when no running statistics are given (as
    ``F.batch_norm``) and then updates the running statistics in place; otherwise it normalizes
    with them. Instance mode given running statistics behaves as ``F.instance_norm`` with
    ``use_input_stats=training``. ``momentum`` may be a 0-dim tensor (a step-dependent factor that
    must not be read back into Python). With ``nonfinite_skips`` (a counter), an update whose
    statistics are NaN or Inf is skipped and counted. ``num_groups`` is group mode's group count.
    ``renorm`` (this step's clip limits, ``RenormLimits.at(steps)``) turns batch-mode training with
    running statistics into Batch Renormalization (``functional.renorm``); elsewhere it is ignored,
    as ``momentum`` is, so one set of arguments serves every mode.

    Raises:
        ValueError: if a statistic would be over a single value (the output would silently be β);
            choosing a mode that has enough values is the caller's job (``adanorm.choose_mode``).
    """
    if mode == "identity" or (not dispatch.capturing() and input.numel() == 0):
        return affine_only(input, weight, bias)  # an empty batch keeps its layout and leaves the statistics alone
    if mode == "batch" and not training and running_mean is not None:
        return torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps,
                                torch.backends.cudnn.enabled)
    if mode == "instance" and running_mean is not None:
        return _instance_norm_with_running_stats(input, weight, bias, running_mean, running_var, training,
                                                 momentum, eps, nonfinite_skips)
    if mode == "batch":
        spatial = _spatial_size(input)
        _require_several_values(input.shape[0] * spatial, input, "batch", "the batch size or the patch size")
        kernel = dispatch.batch_kernel(input)
        if running_mean is None or running_var is None:
            return kernel(input, weight, bias, None, None, 0.0, eps)
        batch_mean, batch_var = scratch_statistics(running_mean, running_var)
        output = kernel(input, weight, bias, batch_mean, batch_var, 1.0, eps)  # scratch := batch statistics
        if renorm is not None:  # r and d read the running statistics before this step's update
            output = renormalize_batch_mode(output, renorm, batch_mean, batch_var, input.shape[0] * spatial,
                                            running_mean, running_var, weight, bias, eps)
        dispatch.blend_kernel(running_mean, running_var)(running_mean, running_var, batch_mean, batch_var, momentum,
                                                        nonfinite_skips)
        return output
    return grouped_norm(input, groups_for_mode(mode, input.shape[1], num_groups), weight, bias, eps)


def grouped_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Statistics per (sample, group) over (C/G)·spatial values: instance (G=C), group, layer (G=1) modes."""
    if not dispatch.capturing() and input.numel() == 0:
        return affine_only(input, weight, bias)  # keeps the layout, where native group norm returns contiguous strides
    _require_several_values(input.shape[1] // num_groups * _spatial_size(input), input, "per-sample",
                            "the patch size or num_groups")
    return dispatch.grouped_kernel(input, num_groups)(input, num_groups, weight, bias, eps)


def _instance_norm_with_running_stats(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                      running_mean: Tensor, running_var: Optional[Tensor], training: bool,
                                      momentum: Union[float, Tensor], eps: float,
                                      nonfinite_skips: Optional[Tensor]) -> Tensor:
    """``F.instance_norm`` with running statistics: what a converted InstanceNorm(track_running_stats=True) runs."""
    if not training:
        return torch.instance_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps,
                                   torch.backends.cudnn.enabled)
    _require_several_values(_spatial_size(input), input, "instance", "the patch size")
    batch_mean, batch_var = scratch_statistics(running_mean, running_var)
    output = torch.instance_norm(input, weight, bias, batch_mean, batch_var, True, 1.0, eps, torch.backends.cudnn.enabled)
    dispatch.blend_kernel(running_mean, running_var)(running_mean, running_var, batch_mean, batch_var, momentum,
                                                    nonfinite_skips)
    return output


def _spatial_size(input: Tensor) -> int:
    size = 1
    for extent in input.shape[2:]:
        size *= extent
    return size


def _require_several_values(values_per_statistic: int, input: Tensor, kind: str, remedy: str) -> None:
    """The one-value check of ``F.batch_norm``/``F.group_norm``, done once, here, for every kernel.

    Counted without the batch size where the statistic does not depend on it, so that a compiler
    tracing with a dynamic batch dimension needs no guard on it. Empty input passes, as natively.
    """
    if values_per_statistic == 1 and input.numel() > 0:
        raise ValueError(
            f"{kind} statistics of input of shape {tuple(input.shape)} would each be over a single value; "
            f"increase {remedy}, or use an AdaptiveNorm layer in mode='auto', which falls back instead."
        )


def affine_only(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """γ·x+β as one fused kernel: the identity mode, for shapes with nothing to normalize over, and
    any mode's output on an empty batch (the same empty output and zero parameter gradients as
    native norms, in the input's layout, where native group norm returns contiguous strides).

    The output has the input's dtype, as native norms give bfloat16/float16 input with float32
    parameters: computed in the promoted dtype, then rounded once. TorchScript compiles it too.
    """
    view: List[int] = [1, -1] + [1] * (input.dim() - 2)
    if weight is not None and bias is not None:
        output = torch.addcmul(bias.view(view), input, weight.view(view))
    elif weight is not None:
        output = input * weight.view(view)
    elif bias is not None:
        output = input + bias.view(view)
    else:
        return input
    if not torch.jit.is_scripting():  # (TorchScript compiles nothing in this block)
        if not dispatch.capturing() and input.numel() == 0 and input.dim() in (4, 5):
            # An empty result's layout is only its strides, which broadcasting does not carry over.
            channels_last = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
            if input.is_contiguous(memory_format=channels_last):
                output = output.contiguous(memory_format=channels_last)
    return output if output.dtype == input.dtype else output.to(input.dtype)


def groups_for_mode(mode: str, num_channels: int, num_groups: int) -> int:
    """The group count that turns the per-sample modes into one parameterized kernel."""
    return {"instance": num_channels, "group": num_groups, "layer": 1}[mode]
