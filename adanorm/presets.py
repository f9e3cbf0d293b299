"""Named momenta for the running statistics, because the right momentum depends on batch size.

PyTorch's momentum=0.1 averages over ~10 batches; at batch 2 that is ~20 samples, so the
running statistics used in eval swing with every step (pytorch/pytorch#41559).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Union

from torch import Tensor


@dataclass(frozen=True)
class MomentumPreset:
    """``momentum`` is fixed; ``None`` counts steps (cumulative), and ``window_samples`` then follows the batch size."""

    name: str
    momentum: Optional[float]
    window_samples: Optional[int] = None

    @property
    def counts_steps(self) -> bool:
        """Whether ``factor`` depends on the step count."""
        return self.momentum is None

    def factor(self, batch_size: int, num_batches_tracked: Tensor) -> Union[float, Tensor]:
        """The running-statistics update factor for this step (``num_batches_tracked`` includes it).

        A fixed momentum is a float; a step-dependent one is a 0-dim tensor computed from the
        counter tensor, never read back into Python: no device sync, nothing for a compiler to guard.
        """
        if not self.counts_steps:
            return self.momentum
        return step_factor(batch_size, num_batches_tracked, self.window_samples or 0)


def step_factor(batch_size: int, num_batches_tracked: Tensor, window_samples: int) -> Tensor:
    """PyTorch's cumulative average (``momentum=None``: 1 / steps) or, with ``window_samples``, the
    ``auto`` preset: ``batch_size / window_samples`` but never less than the cumulative factor, so
    early steps are not biased toward the initial mean 0 / variance 1. TorchScript compiles it too."""
    cumulative = 1.0 / num_batches_tracked.clamp(min=1)
    if window_samples > 0:
        return cumulative.clamp(min=batch_size / window_samples, max=1.0)
    return cumulative


PRESETS: Dict[str, MomentumPreset] = {
    preset.name: preset
    for preset in (
        MomentumPreset("default", 0.1),  # batch >= 16; PyTorch's default
        MomentumPreset("small_batch", 0.05),  # batch 4-8 in batch mode
        MomentumPreset("tiny_batch", 0.01),  # batch 1-3 in batch mode (forced, or a lowered min_batch_size)
        MomentumPreset("cumulative", None),  # fine-tuning or calibrating: every batch weighs the same
        MomentumPreset("auto", None, window_samples=256),  # variable or unknown batch size: ~256 samples
    )
}


def get_preset(name: str) -> MomentumPreset:
    """Look a preset up by name, with the valid names in the error."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)} or pass momentum= instead.")
    return PRESETS[name]
