"""Batch statistics across the ranks of a process group (synchronized batch mode).

With 1–2 volumes per GPU, batch statistics only mean something over the global batch. One
``all_gather`` per layer forward carries each rank's sample count, spatial size and per-channel
count/mean/M2; every rank then merges them with Chan's formula (float64, exact for uneven batches
and for ranks with no samples) and sees the same global shape, so the auto policy takes one
decision for all ranks from the global batch size and the smallest spatial size. In batch mode the
backward pass all-reduces Σdy and Σdy·x̂ (one call), as ``nn.SyncBatchNorm`` does; weight and bias
gradients stay local sums, which DDP then averages. Eval never communicates.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from adanorm.functional.running_stats import Moments, blend, moments


class GlobalBatch(NamedTuple):
    """What every rank knows after the gather: the shape the policy decides on, and the statistics."""

    shape: Tuple[int, ...]  # (global N, C, smallest spatial size among ranks with samples)
    mean: Tensor  # per channel, float64
    variance: Tensor  # biased, per channel, float64
    count: int  # values per channel over all ranks


def is_synced(process_group: Optional[dist.ProcessGroup]) -> bool:
    """Whether there are other ranks to sync with (a single process behaves as unsynced)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def gather_batch(input: Tensor, process_group: Optional[dist.ProcessGroup]) -> GlobalBatch:
    """One all_gather of (N, spatial size, count, mean, M2) per rank, merged on every rank."""
    spatial = 1
    for size in input.shape[2:]:
        spatial *= size
    rows = gather_rows(moments(input), process_group, [float(input.shape[0]), float(spatial)])
    merged, batch, smallest_spatial = rows[0][1], 0, None
    for rank, ((samples, rank_spatial), rank_moments) in enumerate(rows):
        merged = merged.merge(rank_moments) if rank else merged
        batch += int(samples)
        if samples:
            smallest_spatial = int(rank_spatial) if smallest_spatial is None else min(smallest_spatial, int(rank_spatial))
    shape = (batch, input.shape[1], spatial if smallest_spatial is None else smallest_spatial)
    return GlobalBatch(shape, merged.mean, merged.m2 / max(merged.count, 1.0), int(merged.count))


def gather_rows(local: Moments, process_group: Optional[dist.ProcessGroup],
                extras: List[float]) -> List[Tuple[List[float], Moments]]:
    """Every rank's moments (and a few numbers of its own) on every rank, in one all_gather."""
    channels = local.mean.shape[0]
    row = torch.cat([local.mean.new_tensor([local.count] + extras), local.mean, local.m2])
    gathered = [torch.empty_like(row) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, row, group=process_group)
    head = 1 + len(extras)
    return [(row[1:head].tolist(), Moments(float(row[0]), row[head:head + channels], row[head + channels:]))
            for row in gathered]


def synced_batch_norm(
    input: Tensor,
    statistics: GlobalBatch,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
    nonfinite_skips: Optional[Tensor],
    process_group: Optional[dist.ProcessGroup],
) -> Tensor:
    """Normalize with the global statistics and update the running ones with the global batch."""
    mean = statistics.mean.to(input.dtype if input.dtype == torch.float64 else torch.float32)
    invstd = torch.rsqrt(statistics.variance.to(mean.dtype) + eps)
    if running_mean is not None and running_var is not None:
        unbiased = statistics.variance * (statistics.count / max(statistics.count - 1, 1))
        blend(running_mean, running_var, statistics.mean.to(running_mean.dtype), unbiased.to(running_var.dtype),
              momentum, nonfinite_skips)
    return _SyncedBatchNorm.apply(input, weight, bias, mean, invstd, statistics.count, process_group)


def _channel_view(tensor: Tensor, dims: int) -> Tensor:
    return tensor.view((1, -1) + (1,) * (dims - 2))


class _SyncedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
                count: int, process_group: Optional[dist.ProcessGroup]) -> Tensor:
        dims = input.dim()
        normalized = (input - _channel_view(mean, dims).to(input.dtype)) * _channel_view(invstd, dims).to(input.dtype)
        ctx.save_for_backward(normalized, weight, invstd)
        ctx.count, ctx.process_group = count, process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        output = normalized
        if weight is not None:
            output = output * _channel_view(weight, dims).to(input.dtype)
        if bias is not None:
            output = output + _channel_view(bias, dims).to(input.dtype)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        normalized, weight, invstd = ctx.saved_tensors
        dims = grad_output.dim()
        reduce = [0] + list(range(2, dims))
        accumulate = torch.promote_types(grad_output.dtype, torch.float32)
        dy, xhat = grad_output.to(accumulate), normalized.to(accumulate)
        sum_dy, sum_dy_xhat = dy.sum(reduce), (dy * xhat).sum(reduce)  # zeros for a rank with no samples
        grad_input = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, group=ctx.process_group)
            mean_dy, mean_dy_xhat = (both / max(ctx.count, 1)).chunk(2)
            scale = invstd.to(accumulate) if weight is None else invstd.to(accumulate) * weight.to(accumulate)
            grad_input = (_channel_view(scale, dims) * (
                dy - _channel_view(mean_dy, dims) - xhat * _channel_view(mean_dy_xhat, dims))).to(grad_output.dtype)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None


def merge_across_ranks(local: Moments, process_group: Optional[dist.ProcessGroup]) -> Moments:
    """The moments of all ranks' values together, on every rank (one all_gather)."""
    rows = gather_rows(local, process_group, [])
    merged = rows[0][1]
    for _, rank_moments in rows[1:]:
        merged = merged.merge(rank_moments)
    return merged
