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
from adanorm.functional.running_stats import blend, scratch_statistics


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
    """Normalize ``input`` with the statistics of ``mode``: the functional form of :class:`~adanorm.AdaptiveNorm`.

    Every mode of the adaptive layers runs through this one function, so that code that owns its
    parameters (a functional model, ``torch.func``, a custom layer) normalizes exactly as the layers
    do, on the same kernels: the fused CPU or Triton kernels where they are faster, the native ops
    otherwise. It neither chooses the mode (:func:`adanorm.choose_mode` does) nor falls back: a mode
    whose statistics would each be over a single value raises, as the native norms do.

    Batch mode uses batch statistics in training, or when no running statistics are given, and then
    updates the running statistics in place (as ``F.batch_norm``); in eval it normalizes with them.
    Instance mode given running statistics behaves as ``F.instance_norm(use_input_stats=training)``.
    Otherwise instance, group and layer mode normalize per (sample, group) and leave the running
    statistics alone, and identity mode applies only γ and β. An empty batch gives an empty output
    in the input's layout and leaves the running statistics alone.

    Args:
        input (Tensor): ``(N, C, *)`` input, contiguous or channels-last.
        mode (str): ``"batch"``, ``"instance"``, ``"group"``, ``"layer"`` or ``"identity"``.
        weight (Tensor, optional): per-channel scale γ of shape ``(C,)``. Default: ``None``.
        bias (Tensor, optional): per-channel shift β of shape ``(C,)``. Default: ``None``.
        running_mean (Tensor, optional): per-channel running mean; updated in place where batch or
            instance mode uses the input's statistics. Default: ``None``.
        running_var (Tensor, optional): per-channel running (unbiased) variance, updated with
            ``running_mean``. Default: ``None``.
        training (bool): in batch mode, and in instance mode with running statistics, normalize with
            the input's statistics and update the running ones, instead of normalizing with the
            running statistics. Default: ``False``.
        momentum (float or Tensor): update factor of the running statistics,
            ``running = (1 - momentum) * running + momentum * batch``. A 0-dim tensor for a
            step-dependent factor (``MomentumPreset.factor``) is never read back into Python: no
            host sync, nothing for a compiler to guard. Default: ``0.1``.
        eps (float): added to the variance for numerical stability. Default: ``1e-5``.
        num_groups (int): the group count of group mode; the other modes ignore it. Default: ``1``.
        nonfinite_skips (Tensor, optional): a counter. When given, a running-statistics update whose
            statistics hold NaN or Inf is skipped and counted here, instead of poisoning the running
            statistics for every later eval. Default: ``None``.
        renorm (RenormClip, optional): this step's clip limits (``RenormLimits.at(steps)``): batch-mode
            training with running statistics becomes Batch Renormalization (``functional.renorm``).
            Ignored elsewhere, as ``momentum`` is, so one set of arguments serves every mode.
            Default: ``None``.

    Returns:
        Tensor: the normalized input, of the input's shape and dtype.

    Raises:
        ValueError: if a statistic of ``mode`` would be over a single value (batch mode at batch 1
            on a 1×1×1 map, instance mode on a single voxel), where the output would silently be β;
            choosing a mode that has enough values is the caller's job (``adanorm.choose_mode``).

    Example:
        >>> import torch
        >>> from adanorm.functional import adaptive_norm
        >>> x = torch.randn(2, 8, 4, 4, 4)
        >>> running_mean, running_var = torch.zeros(8), torch.ones(8)
        >>> y = adaptive_norm(x, "batch", running_mean=running_mean, running_var=running_var,
        ...                   training=True, momentum=0.05)
        >>> y = adaptive_norm(x, "group", torch.ones(8), torch.zeros(8), num_groups=4)
        >>> adaptive_norm(torch.randn(1, 8, 1, 1, 1), "layer").shape  # batch mode would raise here
        torch.Size([1, 8, 1, 1, 1])
    """
    return normalize(input, mode, weight, bias, running_mean, running_var, training, momentum, eps, num_groups,
                     nonfinite_skips, renorm, dispatch.capturing())


def normalize(input: Tensor, mode: str, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
              running_var: Optional[Tensor], training: bool, momentum: Union[float, Tensor], eps: float, num_groups: int,
              nonfinite_skips: Optional[Tensor], renorm: Optional[RenormClip], captured: bool) -> Tensor:
    """``adaptive_norm`` given ``captured``: the normalize call of the adaptive layers, eager and scripted.

    ``captured`` must be what ``dispatch.capturing()`` returns during this call. Whether a compiler,
    tracer or exporter is recording cannot change within one call, so a layer asks once per forward and
    passes the answer to every step that picks a kernel; ``True`` keeps them to native ops and off
    branches on the input's size, which a trace would fix. TorchScript compiles this function too
    (``adanorm.scripting``, with ``captured=False``): wherever a kernel is picked, the branch under
    ``torch.jit.is_scripting()`` runs the native op, so a scripted layer holds native ops only."""
    if mode == "identity" or (not captured and input.numel() == 0):
        return affine_only(input, weight, bias)  # an empty batch keeps its layout and leaves the statistics alone
    if mode == "batch" and not training and running_mean is not None:
        return torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps,
                                torch.backends.cudnn.enabled)
    if mode == "instance" and running_mean is not None and running_var is not None:
        return _instance_norm_with_running_stats(input, weight, bias, running_mean, running_var, training,
                                                 momentum, eps, nonfinite_skips, captured)
    if mode == "batch":
        spatial = spatial_size(input)
        require_several_values(input.shape[0] * spatial, input, "batch", "the batch size or the patch size")
        if running_mean is None or running_var is None:
            return _batch_statistics_norm(input, weight, bias, None, None, 0.0, eps, captured)
        batch_mean, batch_var = scratch_statistics(running_mean, running_var)
        # momentum 1: the scratch pair becomes the batch statistics
        output = _batch_statistics_norm(input, weight, bias, batch_mean, batch_var, 1.0, eps, captured)
        if renorm is not None:  # r and d read the running statistics before this step's update
            output = renormalize_batch_mode(output, renorm, batch_mean, batch_var, input.shape[0] * spatial,
                                            running_mean, running_var, weight, bias, eps)
        blend_running_statistics(running_mean, running_var, batch_mean, batch_var, momentum, nonfinite_skips, captured)
        return output
    return _grouped_norm(input, groups_for_mode(mode, input.shape[1], num_groups), weight, bias, eps, captured)


def _batch_statistics_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], momentum: float, eps: float, captured: bool) -> Tensor:
    """Batch statistics on ``dispatch.batch_kernel``'s kernel, updating the given running statistics with
    ``momentum`` as ``F.batch_norm`` does; in TorchScript the native op."""
    if torch.jit.is_scripting():
        return torch.batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps,
                                torch.backends.cudnn.enabled)
    return dispatch.batch_kernel(input, captured)(input, weight, bias, running_mean, running_var, momentum, eps)


def blend_running_statistics(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
                             momentum: Union[float, Tensor], nonfinite_skips: Optional[Tensor], captured: bool) -> None:
    """``running_stats.blend`` on ``dispatch.blend_kernel``'s kernel; in TorchScript as written."""
    if torch.jit.is_scripting():
        blend(running_mean, running_var, batch_mean, batch_var, momentum, nonfinite_skips)
    else:
        dispatch.blend_kernel(running_mean, running_var, captured)(running_mean, running_var, batch_mean, batch_var,
                                                                  momentum, nonfinite_skips)


def grouped_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Normalize each (sample, group) of ``input`` by its own statistics: instance, group and layer mode.

    The three per-sample modes differ only in the group count (instance: G = C, layer: G = 1;
    :func:`groups_for_mode` maps them), so they share this entry point, its kernels and its
    precondition check. It computes ``F.group_norm`` on the kernel the adaptive layers pick: the
    fused CPU or Triton kernels where they are faster, and otherwise native group norm with a
    backward that cannot crash; an empty batch keeps the input's layout.

    Args:
        input (Tensor): ``(N, C, *)`` input, contiguous or channels-last.
        num_groups (int): G, a divisor of C; each statistic is over (C/G)·spatial values.
        weight (Tensor, optional): per-channel scale γ of shape ``(C,)``, or ``None``.
        bias (Tensor, optional): per-channel shift β of shape ``(C,)``, or ``None``.
        eps (float): added to the variance for numerical stability.

    Returns:
        Tensor: the normalized input, of the input's shape and dtype.

    Raises:
        ValueError: if each statistic would be over a single value ((C/G)·spatial = 1).

    Example:
        >>> import torch
        >>> from adanorm.functional import grouped_norm, groups_for_mode
        >>> x = torch.randn(2, 8, 4, 4, 4)
        >>> y = grouped_norm(x, groups_for_mode("instance", 8, 1), None, None, 1e-5)
        >>> torch.allclose(y, torch.nn.functional.instance_norm(x), atol=1e-5)
        True
    """
    captured = dispatch.capturing()
    if not captured and input.numel() == 0:
        return affine_only(input, weight, bias)  # keeps the layout, where native group norm returns contiguous strides
    return _grouped_norm(input, num_groups, weight, bias, eps, captured)


def _grouped_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  captured: bool) -> Tensor:
    """``grouped_norm`` on non-empty input (or captured code), once the caller has asked ``capturing()``."""
    require_several_values(input.shape[1] // num_groups * spatial_size(input), input, "per-sample",
                           "the patch size or num_groups")
    if torch.jit.is_scripting():  # contiguous: native group norm's channels-last backward can crash (dispatch._group_norm)
        return torch.group_norm(input.contiguous(), num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
    return dispatch.grouped_kernel(input, num_groups, captured)(input, num_groups, weight, bias, eps)


def _instance_norm_with_running_stats(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                      running_mean: Tensor, running_var: Tensor, training: bool,
                                      momentum: Union[float, Tensor], eps: float,
                                      nonfinite_skips: Optional[Tensor], captured: bool) -> Tensor:
    """``F.instance_norm`` with running statistics: what a converted InstanceNorm(track_running_stats=True) runs."""
    if not training:
        return torch.instance_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps,
                                   torch.backends.cudnn.enabled)
    require_several_values(spatial_size(input), input, "instance", "the patch size")
    batch_mean, batch_var = scratch_statistics(running_mean, running_var)
    output = torch.instance_norm(input, weight, bias, batch_mean, batch_var, True, 1.0, eps, torch.backends.cudnn.enabled)
    blend_running_statistics(running_mean, running_var, batch_mean, batch_var, momentum, nonfinite_skips, captured)
    return output


def spatial_size(input: Tensor) -> int:
    """The number of positions per channel: the product of the dimensions after the first two."""
    size = 1
    for extent in input.shape[2:]:
        size *= extent
    return size


def require_several_values(values_per_statistic: int, input: Tensor, kind: str, remedy: str) -> None:
    """The one-value check of ``F.batch_norm``/``F.group_norm``, done once, here, for every kernel.

    Counted without the batch size where the statistic does not depend on it, so that a compiler
    tracing with a dynamic batch dimension needs no guard on it. Empty input passes, as natively.
    """
    if values_per_statistic == 1 and input.numel() > 0:
        shape = input.shape if torch.jit.is_scripting() else tuple(input.shape)  # TorchScript has no tuple(list)
        raise ValueError(
            f"{kind} statistics of input of shape {shape} would each be over a single value; "
            f"increase {remedy}, or use an AdaptiveNorm layer in mode='auto', which falls back instead."
        )


def affine_only(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """Apply only the per-channel affine map γ·x + β, as one fused kernel: identity mode.

    Identity mode is auto mode's last fallback, for shapes with nothing to normalize over, and
    every mode's output on an empty batch: the same empty output and zero parameter gradients as
    the native norms, in the input's layout (where native group norm returns contiguous strides).
    The output has the input's dtype, as native norms give bfloat16/float16 input with float32
    parameters: computed in the promoted dtype, then rounded once. TorchScript compiles it too.

    Args:
        input (Tensor): ``(N, C, *)`` input.
        weight (Tensor, optional): per-channel scale γ of shape ``(C,)``; ``None`` scales by 1.
        bias (Tensor, optional): per-channel shift β of shape ``(C,)``; ``None`` shifts by 0.

    Returns:
        Tensor: γ·x + β, of the input's shape and dtype (``input`` itself when both are ``None``).

    Example:
        >>> import torch
        >>> from adanorm.functional import affine_only
        >>> affine_only(torch.ones(2, 3, 4), torch.tensor([1.0, 2.0, 3.0]), None)[0, :, 0]
        tensor([1., 2., 3.])
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
    """The group count that makes a per-sample mode one call of :func:`grouped_norm`.

    Instance and layer mode are group norm with G = C and G = 1; mapping them here keeps one
    kernel, one dispatch rule and one precondition check for the three modes.

    Args:
        mode (str): ``"instance"``, ``"group"`` or ``"layer"``.
        num_channels (int): C, instance mode's group count.
        num_groups (int): group mode's group count; the other modes ignore it.

    Returns:
        int: ``num_channels`` for instance mode, ``num_groups`` for group mode, 1 for layer mode.

    Raises:
        KeyError: for ``"batch"`` and ``"identity"``, which have no groups.

    Example:
        >>> from adanorm.functional import groups_for_mode
        >>> [groups_for_mode(mode, 32, 8) for mode in ("instance", "group", "layer")]
        [32, 8, 1]
    """
    if mode == "group":  # an if-chain rather than a dict literal: this runs on every call of a layer
        return num_groups
    if mode == "instance":
        return num_channels
    if mode == "layer":
        return 1
    raise KeyError(mode)
