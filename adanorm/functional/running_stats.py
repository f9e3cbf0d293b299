"""Running-statistics updates, kept apart from the kernels that compute the batch statistics.

Every kernel (native, compiled CPU, Triton) updates running statistics as
``running = (1 − momentum)·running + momentum·batch`` with a Python float momentum. Two things
need more: the momentum of the cumulative and ``auto`` presets depends on the step count, a tensor
that a compiler must not read back into Python; and an update from NaN/Inf statistics must be
skipped without a host sync. So a kernel updates a scratch pair with momentum 1 (which then holds
the batch mean and unbiased variance exactly as the kernel would blend them) and ``blend`` does the
rest with tensor operations. Written in TorchScript's subset: the scripted layers use it too.
"""
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor


def scratch_statistics(running_mean: Tensor, running_var: Tensor) -> Tuple[Tensor, Tensor]:
    """A pair a kernel can update with momentum 1: afterwards it holds the batch statistics."""
    return torch.zeros_like(running_mean), torch.ones_like(running_var)


def blend(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
          factor: Union[float, Tensor], nonfinite_skips: Optional[Tensor]) -> None:
    """``running ← running + factor·(batch − running)``, in place.

    With ``nonfinite_skips`` (a counter), a step whose batch statistics hold NaN or Inf leaves the
    running statistics as they were and adds one to the counter, decided by ``torch.where`` on
    C-sized tensors (no pass over the input, no host sync). Without it, NaN and Inf propagate as
    in native BatchNorm.
    """
    new_mean, new_var = _lerp(running_mean, batch_mean, factor), _lerp(running_var, batch_var, factor)
    if nonfinite_skips is None:
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        return
    finite = torch.isfinite(batch_mean).all() & torch.isfinite(batch_var).all()
    running_mean.copy_(torch.where(finite, new_mean, running_mean))
    running_var.copy_(torch.where(finite, new_var, running_var))
    nonfinite_skips.add_((~finite).long())


def _lerp(start: Tensor, end: Tensor, factor: Union[float, Tensor]) -> Tensor:
    if isinstance(factor, Tensor):  # TorchScript picks the overload only after this refinement
        return start.lerp(end, factor.to(start.dtype))
    return start.lerp(end, factor)


class Moments(NamedTuple):
    """Per-channel count, mean and sum of squared deviations (M2) of a set of values."""

    count: float
    mean: Tensor
    m2: Tensor

    def merge(self, other: "Moments") -> "Moments":
        """Both sets together (Chan et al.): exact for any counts, including zero, without cancellation."""
        total = self.count + other.count
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        delta = other.mean - self.mean
        return Moments(total, self.mean + delta * (other.count / total),
                       self.m2 + other.m2 + delta.square() * (self.count * other.count / total))


def moments(values: Tensor) -> Moments:
    """Moments of every channel of (N, C, *) ``values`` over N and the spatial dimensions, in float64."""
    channels_first = values.detach().transpose(0, 1).reshape(values.shape[1], -1).double()
    count = channels_first.shape[1]
    if count == 0:
        return Moments(0.0, channels_first.new_zeros(values.shape[1]), channels_first.new_zeros(values.shape[1]))
    variance, mean = torch.var_mean(channels_first, dim=1, unbiased=False)
    return Moments(float(count), mean, variance * count)
