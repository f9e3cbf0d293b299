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
    """A named rule for the update factor (momentum) of the running statistics.

    The momentum that keeps eval statistics steady depends on how many samples a step sees, so a
    preset names the choice (``AdaptiveNorm(preset="small_batch")``, ``norm.preset=`` in the recipes)
    instead of leaving a number to tune. :data:`PRESETS` holds the built-in ones, which
    :func:`get_preset` looks up.

    Args:
        name (str): the name :func:`get_preset` and ``preset=`` find it by.
        momentum (float, optional): a fixed update factor, as ``nn.BatchNorm3d``'s ``momentum``;
            ``None`` makes the factor depend on the step count (see ``window_samples``).
        window_samples (int, optional): with ``momentum=None``, the number of samples the running
            statistics average over: the factor is ``batch_size / window_samples``, but never less
            than the cumulative average's ``1 / steps``, so early steps do not lean toward the initial
            mean 0 and variance 1. Without it, ``momentum=None`` is PyTorch's cumulative average.
            Default: ``None``.

    Example:
        >>> import torch
        >>> from adanorm import get_preset
        >>> get_preset("small_batch").momentum
        0.05
        >>> auto = get_preset("auto")  # momentum=None, window_samples=256
        >>> float(auto.factor(batch_size=2, num_batches_tracked=torch.tensor(1000)))
        0.0078125
    """

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
        MomentumPreset("small_batch", 0.05),  # batch 4-8 in batch mode (forced, or a lowered min_batch_size)
        MomentumPreset("tiny_batch", 0.01),  # batch 1-3 in batch mode (forced, or a lowered min_batch_size)
        MomentumPreset("cumulative", None),  # fine-tuning or calibrating: every batch weighs the same
        MomentumPreset("auto", None, window_samples=256),  # variable or unknown batch size: ~256 samples
    )
}


def get_preset(name: str) -> MomentumPreset:
    """The built-in momentum preset called ``name``.

    Presets are chosen by name in configurations (``AdaptiveNorm(preset=...)``, Hydra's
    ``norm.preset=``); this is the one lookup, so that a misspelt name fails with the valid ones.

    Args:
        name (str): one of ``default`` (0.1: batch 16 and more), ``small_batch`` (0.05: batch 4–8),
            ``tiny_batch`` (0.01: batch 1–3), ``cumulative`` (every batch weighs the same, for
            fine-tuning or calibrating) and ``auto`` (about 256 samples, at any batch size).

    Returns:
        MomentumPreset: the preset.

    Raises:
        ValueError: if ``name`` is not in :data:`PRESETS`.

    Example:
        >>> from adanorm import get_preset
        >>> get_preset("tiny_batch").momentum
        0.01
    """
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)} or pass momentum= instead.")
    return PRESETS[name]
