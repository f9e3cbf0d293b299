"""Triton kernels of the normalization backend (launched from ``triton_norm``, which documents the
geometry): one kernel family for every mode, layout and pass.

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
   ``scale = γ·rstd`` and ``shift = β − μ·scale``; in batch mode it also writes the
   updated running stats (to new buffers: the torch op that launches it is functional).
3. ``_finalize_grad_kernel`` turns the backward partials into dγ, dβ and the per-(n, c)
   coefficients of dx = dy_scale·dy + x_scale·x + shift.
4. ``_apply_kernel`` is the only full pass that writes: y = scale·x + shift forward, the dx
   expression above backward, in the input's own layout (or into the input itself).

Statistics accumulate in float32 for float16/bfloat16/float32 input and in float64 for float64.

The fused norm + activation (``functional/norm_act.py``) runs the same four kernels with an ``ACTIVATION``
(0 identity, 1 negative-side slope, 2 ELU, with a per-channel parameter): the apply pass writes
act(scale·x + shift) forward; backward reads the output y instead of x, recovers z and dz = dy·act'(z) from
it in the partial-sums and apply passes, and sums Σdz·(z − β) per channel (β as the per-channel "mean",
``FROM_OUTPUT`` in the finalize kernel, where x̂ = (z − β)/γ replaces (x − μ)·rstd).

This module holds the ``@triton.jit`` functions only and imports nothing but triton, so a compile
check can load it on its own. Importing it never fails: without triton, ``triton`` is None here and
no kernel is defined. Whether the kernels run interpreted (``TRITON_INTERPRET=1``) is decided when
they are decorated, i.e. at this module's first import.
"""
try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: callers keep the native path without it
    triton = None


if triton is not None:

    @triton.jit
    def _log1p(ratio):
        """log(1 + r) accurate for small r (Goldberg's trick: the rounding of 1 + r cancels)."""
        u = 1.0 + ratio
        return tl.where(u == 1.0, ratio, tl.log(u) * (ratio / (u - 1.0)))

    @triton.jit
    def _expm1(z):
        """e^z − 1 accurate for small z (Kahan's trick), for z ≤ 0."""
        u = tl.exp(z)
        return tl.where(u == 1.0, z, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * (z / tl.log(u))))

    @triton.jit
    def _activate(z, parameter, ACTIVATION: tl.constexpr):
        """act(z): 0 identity, 1 z > 0 ? z : s·z (leaky ReLU, PReLU), 2 ELU with α = the parameter."""
        if ACTIVATION == 1:
            return tl.where(z > 0, z, z * parameter)
        elif ACTIVATION == 2:
            return tl.where(z > 0, z, parameter * _expm1(tl.minimum(z, 0.0)))
        else:
            return z

    @triton.jit
    def _pre_activation(y, dy, parameter, ACTIVATION: tl.constexpr):
        """(z, dz = dy·act'(z)) from y = act(z): y ≤ 0 exactly where z ≤ 0, the derivative at 0 the negative
        side's as PyTorch takes it; ELU's y = −α exactly is taken as the smallest z resolved there."""
        if ACTIVATION == 1:
            positive = y > 0
            return tl.where(positive, y, y / parameter), tl.where(positive, dy, dy * parameter)
        elif ACTIVATION == 2:
            positive = y > 0
            ratio = tl.maximum(y / parameter, -0.99999994)  # 1 − 2⁻²⁴: the float32 value next to −1
            return tl.where(positive, y, _log1p(ratio)), tl.where(positive, dy, dy * (y + parameter))
        else:
            return y, dy

    @triton.jit
    def _partial_stats_kernel(
        x_ptr, dy_ptr, stat_mean_ptr, parameter_ptr, partial_a_ptr, partial_b_ptr,
        C, S, chunk, stat_stride_n, channels_per_stat,
        stride_n, stride_c, stride_s,
        BACKWARD: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
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
            if ACTIVATION != 0:
                parameter = tl.load(parameter_ptr + channels, mask=channel_mask, other=1.0).to(acc_dtype)
            a = tl.zeros([BLOCK_C], acc_dtype)  # Σ dy (Σ dz)
            b = tl.zeros([BLOCK_C], acc_dtype)  # Σ dy·(x − μ) (Σ dz·(z − β))
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
                if ACTIVATION != 0:
                    x, dy = _pre_activation(x, dy, parameter[None, :], ACTIVATION)
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
        new_running_mean_ptr, new_running_var_ptr,
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
            tl.store(new_running_mean_ptr + stat_group, running_mean + momentum * (mean - running_mean))
            tl.store(new_running_var_ptr + stat_group, running_var + momentum * (unbiased_var - running_var))

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

    @triton.jit
    def _hat_coefficients(weight_ptr, bias_ptr, channels, mask, rstd, mean,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_OUTPUT: tl.constexpr):
        """(p, shift) per channel with x̂ = p·(v − shift): (rstd, μ) for the input, (1/γ, β) for the pre-activation."""
        ones = tl.zeros(channels.shape, rstd.dtype) + 1.0
        if FROM_OUTPUT:
            p = ones / _times_weight(weight_ptr, channels, mask, ones, HAS_WEIGHT)
            if HAS_BIAS:
                return p, tl.load(bias_ptr + channels, mask=mask, other=0.0).to(rstd.dtype)
            return p, ones * 0.0
        return ones * rstd, ones * mean

    @triton.jit(do_not_specialize=["stat_count"])
    def _finalize_grad_kernel(
        partial_dy_ptr, partial_dy_xc_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr,
        dy_scale_ptr, x_scale_ptr, shift_ptr, grad_weight_ptr, grad_bias_ptr,
        C, rows, cols, partial_sample_stride, partial_row_stride, stat_count,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_OUTPUT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
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
            p, _ = _hat_coefficients(weight_ptr, bias_ptr, channels, row_mask, rstd, mean, HAS_WEIGHT, HAS_BIAS, FROM_OUTPUT)
            tl.store(grad_bias_ptr + sample * C + channels, row_dy, mask=row_mask)
            tl.store(grad_weight_ptr + sample * C + channels, row_dy_xc * p, mask=row_mask)
            weighted_dy += _times_weight(weight_ptr, channels, row_mask, row_dy, HAS_WEIGHT)
            weighted_dy_xc += tl.where(row_mask, _times_weight(weight_ptr, channels, row_mask, row_dy_xc * p, HAS_WEIGHT), 0.0)
        total = stat_count.to(acc_dtype)
        # dx = rstd·(γ·dv − mean(γ·dv) − x̂·mean(γ·dv·x̂)) with x̂ = p·(v − shift), per channel:
        # dx = dy_scale·dv + x_scale·v + shift.
        mean_g = tl.sum(weighted_dy) / total
        mean_g_xhat = tl.sum(weighted_dy_xc) / total

        for r0 in range(0, rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            row_mask = r < rows
            channels = first_channel + r
            dy_scale = _times_weight(weight_ptr, channels, row_mask, tl.zeros([BLOCK_R], acc_dtype) + rstd, HAS_WEIGHT)
            p, hat_shift = _hat_coefficients(weight_ptr, bias_ptr, channels, row_mask, rstd, mean, HAS_WEIGHT, HAS_BIAS,
                                             FROM_OUTPUT)
            coefficient = sample * C + channels
            tl.store(dy_scale_ptr + coefficient, dy_scale, mask=row_mask)
            tl.store(x_scale_ptr + coefficient, -rstd * mean_g_xhat * p, mask=row_mask)
            tl.store(shift_ptr + coefficient, rstd * (mean_g_xhat * p * hat_shift - mean_g), mask=row_mask)

    @triton.jit
    def _apply_kernel(
        x_ptr, dy_ptr, out_ptr, x_scale_ptr, shift_ptr, dy_scale_ptr, parameter_ptr,
        C, S, coefficient_stride_n, stride_n, stride_c, stride_s,
        HAS_DY: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
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
        if ACTIVATION != 0:
            parameter = tl.load(parameter_ptr + channels, mask=channel_mask, other=1.0).to(acc_dtype)[None, :]
        if HAS_DY:
            dy_scale = tl.load(dy_scale_ptr + coefficient, mask=channel_mask, other=0.0)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
            if ACTIVATION != 0:  # x is the fused step's output: z and dz in its place
                x, dy = _pre_activation(x, dy, parameter, ACTIVATION)
            out = x * x_scale[None, :] + shift[None, :] + dy * dy_scale[None, :]
        else:
            out = x * x_scale[None, :] + shift[None, :]
            if ACTIVATION != 0:
                out = _activate(out, parameter, ACTIVATION)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
