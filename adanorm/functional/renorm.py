"""Batch Renormalization (Ioffe 2017) as a correction applied to batch mode's output.

With small or non-i.i.d. batches (a 3D network's 1–2 volumes), the batch statistics a layer
trains with drift from the running statistics it evaluates with. Batch renorm trains with

    x̂ = (x − μ_B)/σ_B · r + d,   r = sg(clip(σ_B/σ, 1/r_max, r_max)),   d = sg(clip((μ_B − μ)/σ, −d_max, d_max))

(σ_B = √(var_B + ε), μ and σ = √(running_var + ε) the running statistics, sg a stop-gradient),
which equals the running-statistics normalization wherever the clips are not active, while the
gradient still flows through the batch statistics. Since r and d are constants in backward,
γx̂ + β = r·(γ(x − μ_B)/σ_B + β) + (γd + β(1 − r)): batch mode's output, from whichever kernel
batch mode picks, followed by one per-channel affine. The batch statistics are the ones that kernel
already wrote for the running-statistics update (float32 or wider, whatever the input dtype), so
nothing is computed twice, and with r = 1, d = 0 the output is batch mode's, bit for bit.

The clip limits ramp from (1, 0), plain batch norm, to (r_max, d_max) over ``warmup_steps``
training steps, as the paper relaxes them: the running statistics must be learned before the
layer can be pulled toward them. The ramp is a tensor function of the step counter, so a compiler
traces it without a guard or a host sync. Written in TorchScript's subset (except
``RenormLimits``): the scripted layers use it too.
"""
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor


class RenormClip(NamedTuple):
    """One step's clip limits, 0-dim tensors: r ∈ [1/r_max, r_max], d ∈ [−d_max, d_max].

    Tensors, not floats, so that a limit that grows during the warm-up never becomes a Python value
    a compiler would guard on (``RenormLimits.at`` makes them).

    Args:
        r_max (Tensor): the bound of the scale correction r (≥ 1; 1 turns it off).
        d_max (Tensor): the bound of the shift correction d (≥ 0; 0 turns it off).
    """

    r_max: Tensor
    d_max: Tensor


class RenormFactors(NamedTuple):
    """One step's per-channel r and d, detached."""

    r: Tensor
    d: Tensor


@dataclass(frozen=True)
class RenormLimits:
    """Batch renorm's clip limits once warmed up, and the warm-up length in training steps.

    The defaults are torchrl's ``BatchRenorm1d`` (3, 5, 10k steps), within the range the paper
    reports (r_max 3 and d_max 5 reached over a few ten thousand steps). The warm-up relaxes the
    limits, as the paper does, rather than blending the clipped r and d toward (1, 0) as torchrl
    does (with ``smooth=True``; by default it switches at the end): r and d inside the current limits
    are applied as they are, so the correction is exact wherever the batch is close to the running
    statistics, from the first learned step on.

    Args:
        r_max (float): r is clipped to [1/r_max, r_max] once warmed up; at least 1. Default: ``3.0``.
        d_max (float): d is clipped to [−d_max, d_max] once warmed up; at least 0. Default: ``5.0``.
        warmup_steps (int): learned steps over which the limits widen linearly from (1, 0); 0: none.
            Default: ``10_000``.

    Raises:
        ValueError: for a limit below its minimum or not finite, or a negative warm-up.
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 10_000

    def __post_init__(self) -> None:
        for name, low in (("r_max", 1.0), ("d_max", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise ValueError(f"renorm_{name}={value!r} is invalid; use a finite number >= {low:g} "
                                 f"({'1 keeps r at 1' if name == 'r_max' else '0 keeps d at 0'}).")
        steps = self.warmup_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"renorm_warmup_steps={steps!r} is invalid; use a non-negative integer (0: no warm-up).")

    def at(self, steps: Tensor, dtype: torch.dtype = torch.float32) -> RenormClip:
        """The limits for a training step taken after ``steps`` learned ones (``num_batches_tracked``),
        for running statistics of ``dtype``."""
        return clip_at(steps, float(self.r_max), float(self.d_max), self.warmup_steps, dtype)


def clip_at(steps: Tensor, r_max: float, d_max: float, warmup_steps: int, dtype: torch.dtype) -> RenormClip:
    """Limits ramped linearly from (1, 0) at step 0 to (r_max, d_max) at ``warmup_steps``, in the
    dtype ``renorm_factors`` computes in (a float32 ramp would round float64 layers' clipped r).

    Step 0 is plain batch norm even without a warm-up: the running statistics are still their
    initial 0/1 then, and pulling the batch toward them would be wrong, not merely noisy.
    """
    progress = (steps.to(factor_dtype(dtype)) / max(warmup_steps, 1)).clamp(0.0, 1.0)
    return RenormClip(1.0 + (r_max - 1.0) * progress, d_max * progress)


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider, whatever the buffers' dtype: float16 buffers of a ``.half()`` model would
    round σ_B/σ to three digits."""
    return torch.promote_types(dtype, torch.float32)


def renorm_factors(batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor, running_var: Tensor,
                   clip: RenormClip, eps: float) -> RenormFactors:
    """r and d from the batch's mean and biased variance and the running statistics before this
    step's update, in ``factor_dtype`` of the buffers'."""
    dtype = factor_dtype(running_var.dtype)
    running_std = (running_var.detach().to(dtype) + eps).sqrt()
    batch_std = (batch_var.detach().to(dtype) + eps).sqrt()
    r_max, d_max = clip.r_max.to(dtype), clip.d_max.to(dtype)
    r = torch.clamp(batch_std / running_std, r_max.reciprocal(), r_max)
    d = torch.clamp((batch_mean.detach().to(dtype) - running_mean.detach().to(dtype)) / running_std, -d_max, d_max)
    return RenormFactors(r, d)


def renormalize_batch_mode(output: Tensor, clip: RenormClip, batch_mean: Tensor, batch_var: Tensor, count: int,
                            running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            eps: float) -> Tensor:
    """Batch mode's ``output`` renormalized, from the statistics its kernel wrote for the running update:
    the mean and unbiased variance of ``count`` values per channel. (Only captured code reaches this
    with an empty batch, whose output is empty whatever r and d are.)"""
    biased_var = batch_var * ((count - 1) / max(count, 1))
    factors = renorm_factors(batch_mean, biased_var, running_mean, running_var, clip, eps)
    return renormalize(output, factors, weight, bias)


def renormalize(normalized: Tensor, factors: RenormFactors, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """γx̂ + β from batch mode's output γ(x − μ_B)/σ_B + β: ``r·normalized + γd + β(1 − r)``.

    Computed in the factors' dtype and rounded once to the input's, as native norms do with
    bfloat16/float16 input. Gradients reach γ and β through both terms and sum to x̂ and 1.
    """
    r, d = factors
    view: List[int] = [1, -1] + [1] * (normalized.dim() - 2)
    shift = d if weight is None else weight * d
    if bias is not None:
        shift = shift + bias * (1.0 - r)
    output = torch.addcmul(shift.view(view), normalized, r.view(view))
    return output if output.dtype == normalized.dtype else output.to(normalized.dtype)
