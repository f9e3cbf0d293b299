"""Named momenta for the running statistics, because the right momentum depends on batch size.

PyTorch's momentum=0.1 averages over ~10 batches; at batch 2 that is ~20 samples, so the
running statistics used in eval swing with every step (pytorch/pytorch#41559).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class MomentumPreset:
    """``momentum`` is fixed; ``window_samples`` makes it follow the batch size instead."""

    name: str
    momentum: Optional[float]
    window_samples: Optional[int] = None
    use_when: str = ""

    @property
    def counts_steps(self) -> bool:
        """Whether ``factor`` needs the step count (reading it costs a device sync on GPU)."""
        return self.momentum is None

    def factor(self, batch_size: int, num_batches_tracked: int) -> float:
        """The running-statistics update factor for this step (``num_batches_tracked`` includes it).

        ``momentum=None`` is PyTorch's cumulative average. The window preset uses
        ``batch_size / window_samples`` but never less than the cumulative factor, so early
        steps are not biased toward the initial mean 0 / variance 1.
        """
        if not self.counts_steps:
            return self.momentum
        cumulative = 1.0 / max(num_batches_tracked, 1)
        if self.window_samples is not None:
            return min(1.0, max(cumulative, batch_size / self.window_samples))
        return cumulative


PRESETS: Dict[str, MomentumPreset] = {
    preset.name: preset
    for preset in (
        MomentumPreset("default", 0.1, use_when="batch >= 16; PyTorch's default"),
        MomentumPreset("small_batch", 0.05, use_when="batch 4-8 in batch mode"),
        MomentumPreset("tiny_batch", 0.01, use_when="batch 1-3 in batch mode (forced, or a lowered min_batch_size)"),
        MomentumPreset("cumulative", None, use_when="fine-tuning or calibrating: equal weight to every batch (PyTorch's momentum=None)"),
        MomentumPreset("auto", None, window_samples=256, use_when="variable or unknown batch size: averages over ~256 samples"),
    )
}


def get_preset(name: str) -> MomentumPreset:
    """Look a preset up by name, with the valid names in the error."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)} or pass momentum= instead.")
    return PRESETS[name]
