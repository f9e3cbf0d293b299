"""Instance normalization for channels-last input, without leaving channels-last.

Native ``instance_norm`` copies channels_last_3d input to contiguous and back
(pytorch/pytorch#72341, #59168), and native channels-last group norm parallelizes over groups,
which starves with one group per channel. A batch-norm kernel applied to one sample at a time
computes exactly the per-(sample, channel) statistics, reduces along the contiguous channel
axis, and writes straight into the slice of a preallocated channels-last output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class _ChannelsLastInstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
        batch, channels = input.shape[:2]
        output = torch.empty_like(input)
        stats_dtype = weight.dtype if weight is not None else input.dtype  # what native_batch_norm saves
        mean = input.new_empty((batch, channels), dtype=stats_dtype)
        invstd = input.new_empty((batch, channels), dtype=stats_dtype)
        for n in range(batch):
            torch.ops.aten.native_batch_norm.out(
                input[n : n + 1], weight, bias, None, None, True, 0.0, eps,
                out=output[n : n + 1], save_mean=mean[n], save_invstd=invstd[n],
            )
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.eps = eps
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        input, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_output = grad_output.contiguous(memory_format=_memory_format(input))
        grad_input = torch.empty_like(input) if need_input and input.shape[0] > 1 else None
        grad_weight = grad_bias = None
        for n in range(input.shape[0]):
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(
                grad_output[n : n + 1], input[n : n + 1], weight, None, None, mean[n], invstd[n],
                True, ctx.eps, [need_input, need_weight, need_bias],
            )
            if need_input and input.shape[0] == 1 and dx.is_contiguous(memory_format=_memory_format(input)):
                grad_input = dx  # one sample: the kernel's own channels-last result, no copy
            elif need_input:
                if grad_input is None:
                    grad_input = torch.empty_like(input)
                grad_input[n : n + 1].copy_(dx)
            if need_weight:
                grad_weight = dw if grad_weight is None else grad_weight + dw
            if need_bias:
                grad_bias = db if grad_bias is None else grad_bias + db
        return grad_input, grad_weight, grad_bias, None


def _memory_format(input: Tensor) -> torch.memory_format:
    return torch.channels_last_3d if input.dim() == 5 else torch.channels_last


def channels_last_instance_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Instance norm of a channels-last (N, C, H, W) or (N, C, D, H, W) tensor; output stays channels-last."""
    return _ChannelsLastInstanceNorm.apply(input, weight, bias, eps)
