"""Triton backend for the normalization modes: one kernel family for every mode, layout and pass.

Every mode is "statistics over a set of values, then a per-channel affine map":

* group, instance (G=C) and layer (G=1) modes: one statistic per (sample, group of channels);
* batch mode: one statistic per channel, across the whole batch.

Four kernels cover all of them, forward and backward, for contiguous (N, C, *) and
channels-last (N, *, C) input alike, because they address memory through (n, c, s) strides:

1. ``_partial_stats_kernel`` reduces one (sample, channel tile, spatial chunk) to per-channel
   partials: Welford (mean, M2) of x forward; Σdy and Σdy·(x−μ) backward. Chunking keeps the GPU
   busy when N·C is small (the small-batch 3D case) without atomics, so results are deterministic.
2. ``_finalize_stats_kernel`` merges the partials of one statistic with Chan's parallel formula
   (robust for large means, unlike E[x²]−E[x]²) and folds the affine parameters into per-(n, c)
   ``scale = γ·rstd`` and ``shift = β − μ·scale``; in batch mode it also updates running stats.
3. ``_finalize_grad_kernel`` turns the backward partials into dγ, dβ and the per-(n, c)
   coefficients of dx = dy_scale·dy + x_scale·x + shift.
4. ``_apply_kernel`` is the only full pass that writes: y = scale·x + shift forward, the dx
   expression above backward, in the input's own layout.

Statistics accumulate in float32 for float16/bfloat16/float32 input and in float64 for float64.
Importing this module never fails: without triton, ``triton_available`` is False and callers keep
the native path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch
from torch import Tensor

from adanorm.functional.layout import is_channels_last
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: every call keeps the native path without it
    triton = None

__all__ = ["triton_available", "prefer_triton", "triton_grouped_norm", "triton_batch_norm"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements per program tile; tests shrink these to drive the chunk and merge loops on tiny inputs.
_MAX_TILE = 2048
_MAX_CHANNEL_BLOCK = 128
# Programs per reduction pass when no GPU reports its size (Triton's interpreter runs them one by one).
_INTERPRETER_PROGRAMS = 8


if triton is not None:

    @triton.jit
    def _partial_stats_kernel(
        x_ptr, dy_ptr, stat_mean_ptr, partial_a_ptr, partial_b_ptr,
        C, S, chunk, stat_stride_n, channels_per_stat,
        stride_n, stride_c, stride_s,
        BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        k = tl.program_id(0)
        c_block = tl.program_id(1)
        n = tl.program_id(2)
        num_chunks = tl.num_programs(0)
        num_samples = tl.num_programs(2)
        acc_dtype = partial_a_ptr.dtype.element_ty

        channels = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
        channel_offsets = n.to(tl.int64) * stride_n + channels[None, :].to(tl.int64) * stride_c
        s_start = k * chunk
        s_end = tl.minimum(s_start + chunk, S)

        if BACKWARD:
            stat_index = n * stat_stride_n + channels // channels_per_stat
            mean = tl.load(stat_mean_ptr + stat_index, mask=channel_mask, other=0.0)
            a = tl.zeros([BLOCK_C], acc_dtype)  # Σ dy
            b = tl.zeros([BLOCK_C], acc_dtype)  # Σ dy·(x − μ)
        else:
            # Statistics of x − pivot, with the chunk's first value as pivot: sums of values near
            # zero keep their low bits when the mean is large against the spread.
            pivot_offsets = n.to(tl.int64) * stride_n + channels.to(tl.int64) * stride_c + s_start.to(tl.int64) * stride_s
            pivot = tl.load(x_ptr + pivot_offsets, mask=channel_mask, other=0.0).to(acc_dtype)
            a = tl.zeros([BLOCK_C], acc_dtype)  # running mean of x − pivot
            b = tl.zeros([BLOCK_C], acc_dtype)  # running M2
        for s0 in range(s_start, s_end, BLOCK_S):
            spatial = s0 + tl.arange(0, BLOCK_S)
            mask = (spatial < s_end)[:, None] & channel_mask[None, :]
            offsets = channel_offsets + spatial[:, None].to(tl.int64) * stride_s
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
            if BACKWARD:
                dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
                a += tl.sum(dy, axis=0)
                b += tl.sum(dy * (x - mean[None, :]), axis=0)
            else:
                # Two-pass statistics of this block, merged into the running ones (Chan et al.).
                seen = (s0 - s_start).to(acc_dtype)
                block_count = tl.minimum(s_end - s0, BLOCK_S).to(acc_dtype)
                shifted = tl.where(mask, x - pivot[None, :], 0.0)
                block_mean = tl.sum(shifted, axis=0) / block_count
                deviation = tl.where(mask, shifted - block_mean[None, :], 0.0)
                block_m2 = tl.sum(deviation * deviation, axis=0)
                total = seen + block_count
                delta = block_mean - a
                a += delta * (block_count / total)
                b += block_m2 + delta * delta * (seen * block_count / total)
        if not BACKWARD:
            a += pivot

        partial = channels.to(tl.int64) * (num_samples * num_chunks) + n * num_chunks + k
        tl.store(partial_a_ptr + partial, a, mask=channel_mask)
        tl.store(partial_b_ptr + partial, b, mask=channel_mask)

    @triton.jit
    def _times_weight(weight_ptr, channels, mask, values, HAS_WEIGHT: tl.constexpr):
        """γ·values per channel, or the values themselves for a layer without weight."""
        if HAS_WEIGHT:
            return tl.load(weight_ptr + channels, mask=mask, other=0.0).to(values.dtype) * values
        return values

    @triton.jit
    def _partial_tile(base, r0, j0, rows, cols, partial_row_stride, chunk, S, num_chunks,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """Offsets, mask and value counts of one (channel rows x partial columns) tile of the partials."""
        r = r0 + tl.arange(0, BLOCK_R)
        j = j0 + tl.arange(0, BLOCK_K)
        mask = (r < rows)[:, None] & (j < cols)[None, :]
        offsets = base + r[:, None].to(tl.int64) * partial_row_stride + j[None, :]
        # Partial column j covers chunk j % num_chunks; the last chunk may be short.
        chunk_size = tl.minimum(chunk, S - (j % num_chunks) * chunk)
        return offsets, mask, tl.where(mask, chunk_size[None, :], 0)

    @triton.jit(do_not_specialize=["stat_count"])
    def _finalize_stats_kernel(
        partial_mean_ptr, partial_m2_ptr, weight_ptr, bias_ptr,
        mean_ptr, rstd_ptr, scale_ptr, shift_ptr, running_mean_ptr, running_var_ptr,
        C, S, chunk, num_chunks, rows, cols, partial_sample_stride, partial_row_stride, stat_count,
        momentum, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        sample = tl.program_id(0)
        stat_group = tl.program_id(1)
        stat = sample * tl.num_programs(1) + stat_group
        acc_dtype = partial_mean_ptr.dtype.element_ty
        first_channel = stat_group * rows
        base = first_channel.to(tl.int64) * partial_row_stride + sample * partial_sample_stride

        total = stat_count.to(acc_dtype)
        # Partial means are averaged relative to the first one, for the same reason as the pivot above.
        reference = tl.load(partial_mean_ptr + base)
        weighted_sum = tl.zeros([BLOCK_R, BLOCK_K], acc_dtype)
        for r0 in range(0, rows, BLOCK_R):
            for j0 in range(0, cols, BLOCK_K):
                offsets, mask, count = _partial_tile(base, r0, j0, rows, cols, partial_row_stride, chunk, S, num_chunks,
                                                     BLOCK_R, BLOCK_K)
                part_mean = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0)
                weighted_sum += count.to(acc_dtype) * (part_mean - reference)
        mean = reference + tl.sum(weighted_sum) / total

        m2_sum = tl.zeros([BLOCK_R, BLOCK_K], acc_dtype)
        for r0 in range(0, rows, BLOCK_R):
            for j0 in range(0, cols, BLOCK_K):
                offsets, mask, count = _partial_tile(base, r0, j0, rows, cols, partial_row_stride, chunk, S, num_chunks,
                                                     BLOCK_R, BLOCK_K)
                part_mean = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0)
                part_m2 = tl.load(partial_m2_ptr + offsets, mask=mask, other=0.0)
                m2_sum += part_m2 + count.to(acc_dtype) * (part_mean - mean) * (part_mean - mean)
        var = tl.sum(m2_sum) / total
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptr + stat, mean)
        tl.store(rstd_ptr + stat, rstd)

        if HAS_RUNNING:
            # Batch mode only: one statistic per channel, so stat_group is the channel.
            running_mean = tl.load(running_mean_ptr + stat_group).to(acc_dtype)
            running_var = tl.load(running_var_ptr + stat_group).to(acc_dtype)
            unbiased_var = var * (total / (total - 1.0))
            tl.store(running_mean_ptr + stat_group, running_mean + momentum * (mean - running_mean))
            tl.store(running_var_ptr + stat_group, running_var + momentum * (unbiased_var - running_var))

        for r0 in range(0, rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            row_mask = r < rows
            channels = first_channel + r
            scale = _times_weight(weight_ptr, channels, row_mask, tl.zeros([BLOCK_R], acc_dtype) + rstd, HAS_WEIGHT)
            if HAS_BIAS:
                shift = tl.load(bias_ptr + channels, mask=row_mask, other=0.0).to(acc_dtype) - mean * scale
            else:
                shift = -mean * scale
            tl.store(scale_ptr + sample * C + channels, scale, mask=row_mask)
            tl.store(shift_ptr + sample * C + channels, shift, mask=row_mask)

    @triton.jit(do_not_specialize=["stat_count"])
    def _finalize_grad_kernel(
        partial_dy_ptr, partial_dy_xc_ptr, weight_ptr, mean_ptr, rstd_ptr,
        dy_scale_ptr, x_scale_ptr, shift_ptr, grad_weight_ptr, grad_bias_ptr,
        C, rows, cols, partial_sample_stride, partial_row_stride, stat_count,
        HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        sample = tl.program_id(0)
        stat_group = tl.program_id(1)
        stat = sample * tl.num_programs(1) + stat_group
        acc_dtype = partial_dy_ptr.dtype.element_ty
        first_channel = stat_group * rows
        base = first_channel.to(tl.int64) * partial_row_stride + sample * partial_sample_stride
        mean = tl.load(mean_ptr + stat)
        rstd = tl.load(rstd_ptr + stat)

        weighted_dy = tl.zeros([BLOCK_R], acc_dtype)
        weighted_dy_xc = tl.zeros([BLOCK_R], acc_dtype)
        for r0 in range(0, rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            row_mask = r < rows
            channels = first_channel + r
            dy_tile = tl.zeros([BLOCK_R, BLOCK_K], acc_dtype)
            dy_xc_tile = tl.zeros([BLOCK_R, BLOCK_K], acc_dtype)
            for j0 in range(0, cols, BLOCK_K):
                j = j0 + tl.arange(0, BLOCK_K)
                mask = row_mask[:, None] & (j < cols)[None, :]
                offsets = base + r[:, None].to(tl.int64) * partial_row_stride + j[None, :]
                dy_tile += tl.load(partial_dy_ptr + offsets, mask=mask, other=0.0)
                dy_xc_tile += tl.load(partial_dy_xc_ptr + offsets, mask=mask, other=0.0)
            row_dy = tl.sum(dy_tile, axis=1)
            row_dy_xc = tl.sum(dy_xc_tile, axis=1)
            tl.store(grad_bias_ptr + sample * C + channels, row_dy, mask=row_mask)
            tl.store(grad_weight_ptr + sample * C + channels, row_dy_xc * rstd, mask=row_mask)
            weighted_dy += _times_weight(weight_ptr, channels, row_mask, row_dy, HAS_WEIGHT)
            weighted_dy_xc += _times_weight(weight_ptr, channels, row_mask, row_dy_xc, HAS_WEIGHT)
        total = stat_count.to(acc_dtype)
        # dx = rstd·(γ·dy − mean(γ·dy) − x̂·mean(γ·dy·x̂)), with x̂ = (x − μ)·rstd.
        x_scale = -rstd * rstd * rstd * (tl.sum(weighted_dy_xc) / total)
        shift = -rstd * (tl.sum(weighted_dy) / total) - x_scale * mean

        for r0 in range(0, rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            row_mask = r < rows
            channels = first_channel + r
            dy_scale = _times_weight(weight_ptr, channels, row_mask, tl.zeros([BLOCK_R], acc_dtype) + rstd, HAS_WEIGHT)
            coefficient = sample * C + channels
            tl.store(dy_scale_ptr + coefficient, dy_scale, mask=row_mask)
            tl.store(x_scale_ptr + coefficient, tl.zeros([BLOCK_R], acc_dtype) + x_scale, mask=row_mask)
            tl.store(shift_ptr + coefficient, tl.zeros([BLOCK_R], acc_dtype) + shift, mask=row_mask)

    @triton.jit
    def _apply_kernel(
        x_ptr, dy_ptr, out_ptr, x_scale_ptr, shift_ptr, dy_scale_ptr,
        C, S, coefficient_stride_n, stride_n, stride_c, stride_s,
        HAS_DY: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        s_block = tl.program_id(0)
        c_block = tl.program_id(1)
        n = tl.program_id(2)
        acc_dtype = x_scale_ptr.dtype.element_ty

        channels = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
        spatial = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (spatial < S)[:, None] & channel_mask[None, :]
        offsets = (n.to(tl.int64) * stride_n + channels[None, :].to(tl.int64) * stride_c
                   + spatial[:, None].to(tl.int64) * stride_s)
        coefficient = n * coefficient_stride_n + channels

        x_scale = tl.load(x_scale_ptr + coefficient, mask=channel_mask, other=0.0)
        shift = tl.load(shift_ptr + coefficient, mask=channel_mask, other=0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
        out = x * x_scale[None, :] + shift[None, :]
        if HAS_DY:
            dy_scale = tl.load(dy_scale_ptr + coefficient, mask=channel_mask, other=0.0)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
            out += dy * dy_scale[None, :]
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _interpreted() -> bool:
    """Whether the kernels above were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_apply_kernel, InterpretedFunction)


_KERNELS_INTERPRETED = _interpreted()


def triton_available(input: Tensor) -> bool:
    """Whether the Triton kernels can run on ``input``'s device and dtype.

    CUDA tensors qualify when triton imports. CPU tensors qualify only when this module was
    imported under ``TRITON_INTERPRET=1``, so tests can check the kernels without a GPU.
    """
    if triton is None or input.dtype not in _SUPPORTED_DTYPES or input.dim() < 2 or input.numel() == 0:
        return False
    return input.is_cuda or (input.device.type == "cpu" and _KERNELS_INTERPRETED)


def prefer_triton(input: Tensor, batch_statistics: bool = False) -> bool:
    """Dispatch rule for CUDA tensors: Triton where native kernels are known to pay extra passes.

    Native CUDA group/instance norm copies channels-last input to contiguous and returns a
    contiguous output, which the next channels-last convolution copies back; the Triton kernels
    read and write channels-last in place. Native CUDA batch norm has channels-last kernels of its
    own, so batch statistics, like contiguous input, keep the native kernels unless
    ``ADANORM_TRITON=1`` (until a GPU measurement says otherwise); ``ADANORM_TRITON=0`` turns the
    backend off.
    """
    switch = os.environ.get("ADANORM_TRITON", "")
    if switch == "0" or not input.is_cuda or not triton_available(input):
        return False
    return switch == "1" or (not batch_statistics and is_channels_last(input))


@dataclass(frozen=True)
class _Geometry:
    """How (N, C, S) values map to statistics and to partial-statistics buffers of shape (C, N, chunks).

    Per-sample modes have one statistic per (sample, group) over ``channels_per_stat`` channels;
    batch mode has one per channel over all samples. The finalize kernels run one program per
    statistic, on a (rows, cols) window of the partial buffers.
    """

    samples: int
    channels: int
    spatial: int
    per_sample: bool
    stat_groups: int  # G for per-sample modes, C for batch mode
    chunk: int
    num_chunks: int
    block_s: int
    block_c: int

    @property
    def stat_samples(self) -> int:
        return self.samples if self.per_sample else 1

    @property
    def channels_per_stat(self) -> int:
        return self.channels // self.stat_groups

    @property
    def stat_count(self) -> int:
        """Values behind one statistic."""
        return self.spatial * (self.channels_per_stat if self.per_sample else self.samples)

    @property
    def partial_cols(self) -> int:
        """Partials per channel row of one statistic: this sample's chunks, or every sample's in batch mode."""
        return self.num_chunks if self.per_sample else self.samples * self.num_chunks

    @property
    def partial_sample_stride(self) -> int:
        return self.num_chunks if self.per_sample else 0

    @property
    def partial_row_stride(self) -> int:
        return self.samples * self.num_chunks

    @property
    def stat_stride_n(self) -> int:
        return self.stat_groups if self.per_sample else 0

    @property
    def coefficient_stride_n(self) -> int:
        return self.channels if self.per_sample else 0


def _next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Enough programs per pass to fill the GPU a few times over, which sizes the spatial chunks."""
    return 4 * _multiprocessor_count(device) if device.type == "cuda" else _INTERPRETER_PROGRAMS


def _geometry(flat: Tensor, per_sample_groups: Optional[int]) -> _Geometry:
    """Tile and chunk sizes for a flattened (N, C, S) view; ``per_sample_groups`` None means batch mode."""
    samples, channels, spatial = flat.shape
    if flat.stride(2) == 1:  # contiguous: spatial runs are the coalesced axis
        block_s = min(_next_power_of_2(spatial), _MAX_TILE)
        block_c = min(_next_power_of_2(channels), max(_MAX_TILE // block_s, 1))
    else:  # channels-last: each spatial position is a contiguous run of channels
        block_c = min(_next_power_of_2(channels), _MAX_CHANNEL_BLOCK, _MAX_TILE)
        block_s = min(_next_power_of_2(spatial), max(_MAX_TILE // block_c, 1))
    tiles_per_chunk = samples * _cdiv(channels, block_c)
    num_chunks = max(1, min(_cdiv(spatial, block_s), _cdiv(_target_programs(flat.device), tiles_per_chunk)))
    chunk = _cdiv(_cdiv(spatial, num_chunks), block_s) * block_s
    per_sample = per_sample_groups is not None
    stat_groups = per_sample_groups if per_sample else channels
    return _Geometry(samples, channels, spatial, per_sample, stat_groups, chunk, _cdiv(spatial, chunk), block_s, block_c)


def _finalize_blocks(geometry: _Geometry) -> Tuple[int, int]:
    rows = geometry.channels_per_stat
    block_r = min(_next_power_of_2(rows), _MAX_TILE)
    block_k = min(_next_power_of_2(geometry.partial_cols), max(_MAX_TILE // block_r, 1))
    return block_r, block_k


def _kernel_layout(input: Tensor) -> Tensor:
    """``input`` in a layout the kernels address by (n, c, s) strides: contiguous or channels-last."""
    if input.is_contiguous() or is_channels_last(input):
        return input
    return input.contiguous()


def _flat(input: Tensor) -> Tensor:
    return input.view(input.shape[0], input.shape[1], -1)


def _accumulation_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _partial_stats(x: Tensor, dy: Optional[Tensor], stat_mean: Optional[Tensor], geometry: _Geometry) -> Tuple[Tensor, Tensor]:
    flat = _flat(x)
    shape = (geometry.channels, geometry.samples, geometry.num_chunks)
    partial_a = flat.new_empty(shape, dtype=_accumulation_dtype(x))
    partial_b = torch.empty_like(partial_a)
    backward = dy is not None
    grid = (geometry.num_chunks, _cdiv(geometry.channels, geometry.block_c), geometry.samples)
    _partial_stats_kernel[grid](
        flat, _flat(dy) if backward else flat, stat_mean if backward else partial_a, partial_a, partial_b,
        geometry.channels, geometry.spatial, geometry.chunk, geometry.stat_stride_n, geometry.channels_per_stat,
        *flat.stride(),
        BACKWARD=backward, BLOCK_S=geometry.block_s, BLOCK_C=geometry.block_c,
    )
    return partial_a, partial_b


def _apply(x: Tensor, dy: Optional[Tensor], x_scale: Tensor, shift: Tensor, dy_scale: Optional[Tensor],
           geometry: _Geometry) -> Tensor:
    out = torch.empty_like(x)
    flat = _flat(x)
    grid = (_cdiv(geometry.spatial, geometry.block_s), _cdiv(geometry.channels, geometry.block_c), geometry.samples)
    has_dy = dy is not None
    _apply_kernel[grid](
        flat, _flat(dy) if has_dy else flat, _flat(out), x_scale, shift, dy_scale if has_dy else x_scale,
        geometry.channels, geometry.spatial, geometry.coefficient_stride_n, *flat.stride(),
        HAS_DY=has_dy, BLOCK_S=geometry.block_s, BLOCK_C=geometry.block_c,
    )
    return out


class _TritonNorm(torch.autograd.Function):
    """Normalization + affine with Triton kernels; ``num_groups`` None selects batch mode."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: Optional[int],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float) -> Tensor:
        x = _kernel_layout(input)
        geometry = _geometry(_flat(x), num_groups)
        partial_mean, partial_m2 = _partial_stats(x, None, None, geometry)

        stat_shape = (geometry.stat_samples, geometry.stat_groups)
        mean = partial_mean.new_empty(stat_shape)
        rstd = partial_mean.new_empty(stat_shape)
        scale = partial_mean.new_empty((geometry.stat_samples, geometry.channels))
        shift = torch.empty_like(scale)
        has_running = running_mean is not None
        block_r, block_k = _finalize_blocks(geometry)
        _finalize_stats_kernel[stat_shape](
            partial_mean, partial_m2, weight, bias, mean, rstd, scale, shift, running_mean, running_var,
            geometry.channels, geometry.spatial, geometry.chunk, geometry.num_chunks, geometry.channels_per_stat,
            geometry.partial_cols, geometry.partial_sample_stride, geometry.partial_row_stride, geometry.stat_count,
            momentum, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RUNNING=has_running,
            BLOCK_R=block_r, BLOCK_K=block_k,
        )
        output = _apply(x, None, scale, shift, None, geometry)

        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.geometry = geometry
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        geometry = ctx.geometry
        dy = grad_output if grad_output.stride() == x.stride() else torch.empty_like(x).copy_(grad_output)
        partial_dy, partial_dy_xc = _partial_stats(x, dy, mean, geometry)

        coefficient_shape = (geometry.stat_samples, geometry.channels)
        dy_scale = partial_dy.new_empty(coefficient_shape)
        x_scale = torch.empty_like(dy_scale)
        shift = torch.empty_like(dy_scale)
        grad_weight_parts = torch.empty_like(dy_scale)
        grad_bias_parts = torch.empty_like(dy_scale)
        block_r, block_k = _finalize_blocks(geometry)
        _finalize_grad_kernel[(geometry.stat_samples, geometry.stat_groups)](
            partial_dy, partial_dy_xc, weight, mean, rstd,
            dy_scale, x_scale, shift, grad_weight_parts, grad_bias_parts,
            geometry.channels, geometry.channels_per_stat,
            geometry.partial_cols, geometry.partial_sample_stride, geometry.partial_row_stride, geometry.stat_count,
            HAS_WEIGHT=weight is not None, BLOCK_R=block_r, BLOCK_K=block_k,
        )

        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = _apply(x, dy, x_scale, shift, dy_scale, geometry) if need_input else None
        grad_weight = grad_weight_parts.sum(0).to(weight.dtype) if need_weight else None
        grad_bias = grad_bias_parts.sum(0).to(ctx.bias_dtype) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _channel_parameter(parameter: Optional[Tensor], channels: int) -> Optional[Tensor]:
    """A per-channel parameter the kernels can index as a dense vector (they never bounds-check it)."""
    if parameter is None:
        return None
    if parameter.numel() != channels:
        raise RuntimeError(f"Expected a per-channel parameter with {channels} elements, got shape {list(parameter.shape)}")
    return parameter.contiguous()


def triton_grouped_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float) -> Tensor:
    """Group norm of (N, C, *) ``input`` as ``F.group_norm``, in the input's memory format.

    Instance mode is ``num_groups == C``, layer mode ``num_groups == 1``. Callers check
    ``triton_available(input)`` first.
    """
    channels = input.shape[1]
    if channels % num_groups:
        # RuntimeError as F.group_norm raises, so callers see one error type whichever path runs.
        raise RuntimeError(f"Expected number of channels in input ({channels}) to be divisible by num_groups ({num_groups})")
    if input.numel() // num_groups == 1:  # F.group_norm's own check, so both paths accept the same shapes
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(input.shape)}")
    weight, bias = _channel_parameter(weight, channels), _channel_parameter(bias, channels)
    return _TritonNorm.apply(input, weight, bias, num_groups, None, None, 0.0, eps)


def triton_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float) -> Tensor:
    """Training-mode batch norm (batch statistics) as ``F.batch_norm(..., training=True)``.

    Running statistics, when given, are updated in place with the unbiased batch variance.
    Evaluation with running statistics is a plain affine map, which native kernels already do in one pass.
    """
    channels = input.shape[1]
    if input.numel() // channels < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(input.shape)}")
    weight, bias = _channel_parameter(weight, channels), _channel_parameter(bias, channels)
    return _TritonNorm.apply(input, weight, bias, None, running_mean, running_var, momentum, eps)
