"""Triton backend for the normalization modes: launches, dispatch rule and torch op registration.

The kernels live in ``triton_kernels`` (whose docstring describes the four passes); this module
sizes their tiles and grids, allocates their buffers and launches them. The entry points are torch
ops, so that dynamo, AOTAutograd and torch.export see one op with known output shapes (its fake
implementation) rather than Triton launches:

* ``adanorm::triton_grouped_norm`` — group, instance (G=C) and layer (G=1) modes;
* ``adanorm::triton_batch_norm`` — batch statistics; functional, it returns the updated running
  statistics, which ``triton_batch_norm`` copies into the old ones in place;
* ``adanorm::triton_norm_backward`` — the backward of both, called by their registered autograd
  formulas;
* ``adanorm::triton_norm_activation`` / ``triton_norm_activation_backward`` — the fused norm + activation
  (``norm_act``), whose autograd.Function calls them; the forward writes into a given output, which may be its
  input.

``triton_grouped_norm`` and ``triton_batch_norm`` below call them as ``F.group_norm`` and
``F.batch_norm(training=True)`` are called; the CUDA dispatch rule is ``dispatch.prefer_triton``.
Importing this module never fails: without triton, ``triton_available`` is False and callers keep
the native path (the ops are registered all the same, and raise if called).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch
from torch import Tensor

from adanorm.functional import triton_kernels as kernels
from adanorm.functional.layout import KERNEL_DTYPES, is_channels_last
from adanorm.functional.triton_kernels import triton  # None without triton

__all__ = ["triton_available", "triton_grouped_norm", "triton_batch_norm", "triton_norm_activation",
           "triton_norm_activation_backward"]

# Elements per program tile; tests shrink these to drive the chunk and merge loops on tiny inputs.
_MAX_TILE = 2048
_MAX_CHANNEL_BLOCK = 128
# Programs per reduction pass when no GPU reports its size (Triton's interpreter runs them one by one).
_INTERPRETER_PROGRAMS = 8


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels._apply_kernel, InterpretedFunction)


_KERNELS_INTERPRETED = _interpreted()


def triton_available(input: Tensor) -> bool:
    """Whether the Triton kernels can run on ``input``'s device and dtype.

    CUDA tensors qualify when triton imports. CPU tensors qualify only when this module was
    imported under ``TRITON_INTERPRET=1``, so tests can check the kernels without a GPU.
    """
    if triton is None or input.dtype not in KERNEL_DTYPES or input.dim() < 2 or input.numel() == 0:
        return False
    return input.is_cuda or (input.device.type == "cpu" and _KERNELS_INTERPRETED)


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


@dataclass(frozen=True)
class _Activation:
    """The activation a fused norm + activation applies (``code``: 0 identity, 1 slope, 2 ELU) and its
    per-channel parameter (C,) in the accumulation dtype, or None for plain normalization."""

    code: int = 0
    parameter: Optional[Tensor] = None


_NO_ACTIVATION = _Activation()


def _partial_stats(x: Tensor, dy: Optional[Tensor], stat_mean: Optional[Tensor], geometry: _Geometry,
                   activation: Optional[_Activation] = None) -> Tuple[Tensor, Tensor]:
    """Forward partials of x; backward ones of (x, dy) against ``stat_mean`` per statistic, or, with an
    ``activation`` (identity included), of (z, dz) recovered from the output x against a per-channel
    ``stat_mean`` (β)."""
    per_channel = activation is not None
    activation = activation or _NO_ACTIVATION
    flat = _flat(x)
    shape = (geometry.channels, geometry.samples, geometry.num_chunks)
    partial_a = flat.new_empty(shape, dtype=_accumulation_dtype(x))
    partial_b = torch.empty_like(partial_a)
    backward = dy is not None
    grid = (geometry.num_chunks, _cdiv(geometry.channels, geometry.block_c), geometry.samples)
    kernels._partial_stats_kernel[grid](
        flat, _flat(dy) if backward else flat, stat_mean if backward else partial_a,
        partial_a if activation.parameter is None else activation.parameter, partial_a, partial_b,
        geometry.channels, geometry.spatial, geometry.chunk, 0 if per_channel else geometry.stat_stride_n,
        1 if per_channel else geometry.channels_per_stat, *flat.stride(),
        BACKWARD=backward, ACTIVATION=activation.code, BLOCK_S=geometry.block_s, BLOCK_C=geometry.block_c,
    )
    return partial_a, partial_b


def _apply(x: Tensor, dy: Optional[Tensor], x_scale: Tensor, shift: Tensor, dy_scale: Optional[Tensor],
           geometry: _Geometry, activation: _Activation = _NO_ACTIVATION, out: Optional[Tensor] = None) -> Tensor:
    """The write pass into ``out`` (x's layout; x itself to overwrite it), a new tensor by default."""
    out = torch.empty_like(x) if out is None else out
    flat = _flat(x)
    grid = (_cdiv(geometry.spatial, geometry.block_s), _cdiv(geometry.channels, geometry.block_c), geometry.samples)
    has_dy = dy is not None
    kernels._apply_kernel[grid](
        flat, _flat(dy) if has_dy else flat, _flat(out), x_scale, shift, dy_scale if has_dy else x_scale,
        x_scale if activation.parameter is None else activation.parameter,
        geometry.channels, geometry.spatial, geometry.coefficient_stride_n, *flat.stride(),
        HAS_DY=has_dy, ACTIVATION=activation.code, BLOCK_S=geometry.block_s, BLOCK_C=geometry.block_c,
    )
    return out


def _check_input(input: Tensor) -> None:
    """What the kernels need of the input; the public functions' callers check ``triton_available`` first."""
    if input.dtype not in KERNEL_DTYPES or input.dim() < 2:
        raise RuntimeError(f"Triton norm expects (N, C, *) floating-point input, "
                           f"got {input.dtype} of shape {list(input.shape)}")
    if triton is None:
        raise RuntimeError("Triton norm kernels cannot run: triton is not installed")
    if not (input.is_cuda or (input.device.type == "cpu" and _KERNELS_INTERPRETED)):
        raise RuntimeError(f"Triton norm kernels cannot run on {input.device} tensors "
                           "(CPU tensors only under TRITON_INTERPRET=1, for tests)")


def _check_parameters(channels: int, *parameters: Optional[Tensor]) -> None:
    """Per-channel parameters the kernels can index as a dense vector (they never bounds-check them)."""
    for parameter in parameters:
        if parameter is not None and parameter.numel() != channels:
            raise RuntimeError(f"Expected a per-channel parameter with {channels} elements, got shape {list(parameter.shape)}")


def _check_grouped(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    channels = input.shape[1]
    if channels % num_groups:
        # RuntimeError as F.group_norm raises, so callers see one error type whichever path runs.
        raise RuntimeError(f"Expected number of channels in input ({channels}) to be divisible by num_groups ({num_groups})")
    if input.numel() // num_groups == 1:  # F.group_norm's own check, so both paths accept the same shapes
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(input.shape)}")
    _check_parameters(channels, weight, bias)


def _check_batch(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                 running_var: Optional[Tensor]) -> None:
    channels = input.shape[1]
    if input.numel() // channels < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(input.shape)}")
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("Expected running_mean and running_var to be both given or both None")
    _check_parameters(channels, weight, bias, running_mean, running_var)


def _forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: Optional[int],
             running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
             eps: float, activation: _Activation = _NO_ACTIVATION,
             out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalization + affine, ``num_groups`` None selecting batch mode.

    Returns (output, mean, rstd, new running mean, new running var): output in the kernel layout
    of ``input``; mean and rstd of shape (N, G) per sample or (1, C) in batch mode, in the
    accumulation dtype; the running statistics blended with this batch's into new tensors (empty
    without running statistics), which ``triton_batch_norm`` copies into the old ones. With an activation, the
    output is act(normalized), written into ``out`` when given.
    """
    _check_input(input)
    x = _kernel_layout(input)
    weight, bias, running_mean, running_var = (_dense(t) for t in (weight, bias, running_mean, running_var))
    new_running_mean, new_running_var = _new_running_statistics(input, running_mean, running_var)
    has_running = running_mean is not None
    geometry = _geometry(_flat(x), num_groups)
    partial_mean, partial_m2 = _partial_stats(x, None, None, geometry)

    stat_shape = (geometry.stat_samples, geometry.stat_groups)
    mean = partial_mean.new_empty(stat_shape)
    rstd = partial_mean.new_empty(stat_shape)
    scale = partial_mean.new_empty((geometry.stat_samples, geometry.channels))
    shift = torch.empty_like(scale)
    block_r, block_k = _finalize_blocks(geometry)
    kernels._finalize_stats_kernel[stat_shape](
        partial_mean, partial_m2, weight, bias, mean, rstd, scale, shift, running_mean, running_var,
        *((new_running_mean, new_running_var) if has_running else (None, None)),
        geometry.channels, geometry.spatial, geometry.chunk, geometry.num_chunks, geometry.channels_per_stat,
        geometry.partial_cols, geometry.partial_sample_stride, geometry.partial_row_stride, geometry.stat_count,
        momentum, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RUNNING=has_running,
        BLOCK_R=block_r, BLOCK_K=block_k,
    )
    output = _apply(x, None, scale, shift, None, geometry, activation, out)
    return output, mean, rstd, new_running_mean, new_running_var


def _backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
              num_groups: Optional[int], input_grad: bool, bias: Optional[Tensor] = None,
              activation: Optional[_Activation] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of ``_forward``; the parameter gradients in the
    accumulation dtype, grad_input empty (0 elements) unless ``input_grad``. With ``activation``, ``input``
    is the fused step's output, read in place of its input (``mean`` is then unused, ``bias`` needed)."""
    _check_input(input)
    x = _kernel_layout(input)
    weight, bias = _dense(weight), _dense(bias)
    geometry = _geometry(_flat(x), num_groups)
    dy = grad_output if grad_output.stride() == x.stride() else torch.empty_like(x).copy_(grad_output)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    from_output = activation is not None
    if from_output:  # sums of dz·(z − β): β per channel in the statistics' place
        shift = bias.to(rstd.dtype) if bias is not None else rstd.new_zeros(geometry.channels)
        partial_dy, partial_dy_xc = _partial_stats(x, dy, shift, geometry, activation)
    else:
        partial_dy, partial_dy_xc = _partial_stats(x, dy, mean, geometry)

    coefficient_shape = (geometry.stat_samples, geometry.channels)
    dy_scale = partial_dy.new_empty(coefficient_shape)
    x_scale = torch.empty_like(dy_scale)
    shift = torch.empty_like(dy_scale)
    grad_weight_parts = torch.empty_like(dy_scale)
    grad_bias_parts = torch.empty_like(dy_scale)
    block_r, block_k = _finalize_blocks(geometry)
    kernels._finalize_grad_kernel[(geometry.stat_samples, geometry.stat_groups)](
        partial_dy, partial_dy_xc, weight, bias, mean, rstd,
        dy_scale, x_scale, shift, grad_weight_parts, grad_bias_parts,
        geometry.channels, geometry.channels_per_stat,
        geometry.partial_cols, geometry.partial_sample_stride, geometry.partial_row_stride, geometry.stat_count,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, FROM_OUTPUT=from_output,
        BLOCK_R=block_r, BLOCK_K=block_k,
    )
    grad_input = (_apply(x, dy, x_scale, shift, dy_scale, geometry, activation or _NO_ACTIVATION) if input_grad
                  else x.new_empty(0))
    return grad_input, grad_weight_parts.sum(0), grad_bias_parts.sum(0)


def _dense(parameter: Optional[Tensor]) -> Optional[Tensor]:
    return None if parameter is None else parameter.contiguous()


def _new_running_statistics(input: Tensor, running_mean: Optional[Tensor],
                            running_var: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Buffers for the updated running statistics (real and fake implementations alike)."""
    if running_mean is None:
        empty = input.new_empty((0,), dtype=_accumulation_dtype(input))
        return empty, torch.empty_like(empty)
    return running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape)


# Torch ops, so that dynamo, AOTAutograd and torch.export see one opaque op with known output shapes
# (the fake implementations) instead of tracing into Triton launches. Names stay clear of the C++
# CPU kernels' adanorm::fused_norm and adanorm::native_group_norm. All three are functional:
# torch.library refuses autograd formulas for ops that mutate their arguments, so the batch op
# returns the updated running statistics and ``triton_batch_norm`` copies them in place (which
# torch.compile and torch.export record as buffer mutations, as they do for native batch norm).
_GROUPED_SCHEMA = ("(Tensor input, SymInt num_groups, Tensor? weight, Tensor? bias, float eps) "
                   "-> (Tensor, Tensor, Tensor)")
_BATCH_SCHEMA = ("(Tensor input, Tensor? running_mean, Tensor? running_var, Tensor? weight, Tensor? bias, "
                 "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor rstd, SymInt? num_groups, "
                    "bool input_grad) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("adanorm::triton_grouped_norm", mutates_args=(), schema=_GROUPED_SCHEMA)
def _grouped_norm_op(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Group norm of (N, C, *) input: (output in the input's kernel layout, mean (N, G), rstd (N, G))."""
    _check_grouped(input, num_groups, weight, bias)
    return _forward(input, weight, bias, num_groups, None, None, 0.0, eps)[:3]


@torch.library.custom_op("adanorm::triton_batch_norm", mutates_args=(), schema=_BATCH_SCHEMA)
def _batch_norm_op(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], momentum: float,
                   eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm: (output, mean (1, C), rstd (1, C), new running mean, new running
    var); the last two are empty without running statistics, which stay untouched."""
    _check_batch(input, weight, bias, running_mean, running_var)
    return _forward(input, weight, bias, None, running_mean, running_var, momentum, eps)


@torch.library.custom_op("adanorm::triton_norm_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _norm_backward_op(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                      num_groups: Optional[int], input_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of both forward ops (``num_groups`` None: batch mode): (grad_input or an empty tensor
    unless ``input_grad``, grad_weight (C,), grad_bias (C,)), the last two in the accumulation dtype."""
    return _backward(grad_output, input, weight, mean, rstd, num_groups, input_grad)


def _fake_statistics(input: Tensor, num_groups: Optional[int]) -> Tuple[Tensor, Tensor]:
    shape = (input.shape[0], num_groups) if num_groups is not None else (1, input.shape[1])
    mean = input.new_empty(shape, dtype=_accumulation_dtype(input))
    return mean, torch.empty_like(mean)


@_grouped_norm_op.register_fake
def _grouped_norm_fake(input, num_groups, weight, bias, eps):
    _check_grouped(input, num_groups, weight, bias)
    return (torch.empty_like(_kernel_layout(input)), *_fake_statistics(input, num_groups))


@_batch_norm_op.register_fake
def _batch_norm_fake(input, running_mean, running_var, weight, bias, momentum, eps):
    _check_batch(input, weight, bias, running_mean, running_var)
    return (torch.empty_like(_kernel_layout(input)), *_fake_statistics(input, None),
            *_new_running_statistics(input, running_mean, running_var))


@_norm_backward_op.register_fake
def _norm_backward_fake(grad_output, input, weight, mean, rstd, num_groups, input_grad):
    grad_input = torch.empty_like(_kernel_layout(input)) if input_grad else input.new_empty(0)
    grad_weight = input.new_empty((input.shape[1],), dtype=_accumulation_dtype(input))
    return grad_input, grad_weight, torch.empty_like(grad_weight)


def _setup_context(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: Optional[int],
                   parameter_indices: Tuple[int, int], output: Tuple[Tensor, ...]) -> None:
    mean, rstd = output[1:3]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(input, weight, mean, rstd)
    ctx.num_groups = num_groups
    ctx.parameter_indices = parameter_indices  # where weight and bias sit among the op's arguments
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grouped_setup_context(ctx, inputs, output) -> None:
    input, num_groups, weight, bias, _ = inputs
    _setup_context(ctx, input, weight, bias, num_groups, (2, 3), output)


def _batch_setup_context(ctx, inputs, output) -> None:
    input, _, _, weight, bias, _, _ = inputs
    _setup_context(ctx, input, weight, bias, None, (3, 4), output)


def _norm_backward(ctx, grad_output: Tensor, *_statistics_grads: Tensor) -> Tuple[Optional[Tensor], ...]:
    """Gradients for every argument of either forward op. Once differentiable: the backward op has
    no derivative of its own, so ``create_graph=True`` through it raises when differentiated again."""
    input, weight, mean, rstd = ctx.saved_tensors
    weight_index, bias_index = ctx.parameter_indices
    need_input = ctx.needs_input_grad[0]
    grad_input, grad_weight, grad_bias = _norm_backward_op(
        grad_output, input, weight, mean, rstd, ctx.num_groups, need_input)
    grads = [None] * len(ctx.needs_input_grad)
    grads[0] = grad_input if need_input else None
    if ctx.needs_input_grad[weight_index]:
        grads[weight_index] = grad_weight.to(ctx.weight_dtype)
    if ctx.needs_input_grad[bias_index]:
        grads[bias_index] = grad_bias.to(ctx.bias_dtype)
    return tuple(grads)


_grouped_norm_op.register_autograd(_norm_backward, setup_context=_grouped_setup_context)
_batch_norm_op.register_autograd(_norm_backward, setup_context=_batch_setup_context)


_NORM_ACTIVATION_SCHEMA = ("(Tensor input, Tensor? weight, Tensor? bias, SymInt? num_groups, float eps, int activation, "
                           "Tensor? parameter, Tensor(a!) out) -> (Tensor, Tensor, Tensor)")
_NORM_ACTIVATION_BACKWARD_SCHEMA = ("(Tensor grad_output, Tensor output, Tensor? weight, Tensor? bias, Tensor rstd, "
                                    "SymInt? num_groups, int activation, Tensor? parameter, bool input_grad) "
                                    "-> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("adanorm::triton_norm_activation", mutates_args=("out",), schema=_NORM_ACTIVATION_SCHEMA)
def _norm_activation_op(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: Optional[int],
                        eps: float, activation: int, parameter: Optional[Tensor], out: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused norm + activation's forward (``functional/norm_act.py``; ``num_groups`` None: batch statistics):
    act(normalized input) written into ``out`` (the input's kernel layout, or the input itself); returns rstd
    ((N, G) or (1, C)) and the batch mean and unbiased variance per channel (empty for per-sample statistics)."""
    if num_groups is None:
        _check_batch(input, weight, bias, None, None)
        zeros = input.new_zeros(input.shape[1], dtype=_accumulation_dtype(input))
        _, _, rstd, batch_mean, batch_var = _forward(input, weight, bias, None, zeros, zeros.clone(), 1.0, eps,
                                                     _Activation(activation, parameter), out)
        return rstd, batch_mean, batch_var
    _check_grouped(input, num_groups, weight, bias)
    _, _, rstd, batch_mean, batch_var = _forward(input, weight, bias, num_groups, None, None, 0.0, eps,
                                                 _Activation(activation, parameter), out)
    return rstd, batch_mean, batch_var


@torch.library.custom_op("adanorm::triton_norm_activation_backward", mutates_args=(),
                         schema=_NORM_ACTIVATION_BACKWARD_SCHEMA)
def _norm_activation_backward_op(grad_output: Tensor, output: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                 rstd: Tensor, num_groups: Optional[int], activation: int, parameter: Optional[Tensor],
                                 input_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Its backward from the output: (grad_input or an empty tensor, grad_weight (C,), grad_bias (C,)), the last two
    in the accumulation dtype."""
    return _backward(grad_output, output, weight, rstd, rstd, num_groups, input_grad, bias,
                     _Activation(activation, parameter))


@_norm_activation_op.register_fake
def _norm_activation_fake(input, weight, bias, num_groups, eps, activation, parameter, out):
    statistics = _fake_statistics(input, num_groups)
    vectors = _new_running_statistics(input, *((None, None) if num_groups is not None else 2 * (statistics[0][0],)))
    return statistics[1], *vectors


@_norm_activation_backward_op.register_fake
def _norm_activation_backward_fake(grad_output, output, weight, bias, rstd, num_groups, activation, parameter, input_grad):
    return _norm_backward_fake(grad_output, output, weight, rstd, rstd, num_groups, input_grad)


def triton_norm_activation(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: Optional[int],
                           eps: float, activation: int, parameter: Optional[Tensor],
                           out: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``adanorm::triton_norm_activation`` with dense per-channel vectors: ``parameter`` is the activation's
    per-channel slope or α (C,), None for identity. ``out`` must be dense in ``input``'s kernel layout."""
    channels = input.shape[1]
    weight, bias = _channel_parameter(weight, channels), _channel_parameter(bias, channels)
    return _norm_activation_op(input, weight, bias, num_groups, eps, activation, _channel_parameter(parameter, channels),
                               out)


def triton_norm_activation_backward(grad_output: Tensor, output: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                    rstd: Tensor, num_groups: Optional[int], activation: int, parameter: Optional[Tensor],
                                    input_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    channels = output.shape[1]
    weight, bias = _channel_parameter(weight, channels), _channel_parameter(bias, channels)
    return _norm_activation_backward_op(grad_output, output, weight, bias, rstd, num_groups, activation,
                                        _channel_parameter(parameter, channels), input_grad)


def _channel_parameter(parameter: Optional[Tensor], channels: int) -> Optional[Tensor]:
    """A per-channel parameter the kernels can index as a dense vector (they never bounds-check it)."""
    if parameter is None:
        return None
    _check_parameters(channels, parameter)
    return parameter.contiguous()


def triton_grouped_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float) -> Tensor:
    """Group norm of (N, C, *) ``input`` as ``F.group_norm``, in the input's memory format
    (``adanorm::triton_grouped_norm``).

    Instance mode is ``num_groups == C``, layer mode ``num_groups == 1``. Callers check
    ``triton_available(input)`` first.
    """
    channels = input.shape[1]
    weight, bias = _channel_parameter(weight, channels), _channel_parameter(bias, channels)
    return _grouped_norm_op(_kernel_layout(input), num_groups, weight, bias, eps)[0]


def triton_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float) -> Tensor:
    """Training-mode batch norm (batch statistics) as ``F.batch_norm(..., training=True)``
    (``adanorm::triton_batch_norm``).

    Running statistics, when given, are updated in place with the unbiased batch variance.
    Evaluation with running statistics is a plain affine map, which native kernels already do in one pass.
    """
    channels = input.shape[1]
    weight, bias = _channel_parameter(weight, channels), _channel_parameter(bias, channels)
    output, _, _, new_running_mean, new_running_var = _batch_norm_op(
        _kernel_layout(input), running_mean, running_var, weight, bias, momentum, eps)
    if running_mean is not None:  # buffers outside autograd, as native batch norm's running statistics are
        running_mean.copy_(new_running_mean)
        running_var.copy_(new_running_var)
    return output
