"""Registers ``"adaptive"`` in MONAI's norm factory, so networks take ``norm="adaptive"``."""
from __future__ import annotations

from monai.networks.layers.factories import Norm

from adanorm.norm import AdaptiveNorm1d, AdaptiveNorm2d, AdaptiveNorm3d

_BY_SPATIAL_DIMS = {1: AdaptiveNorm1d, 2: AdaptiveNorm2d, 3: AdaptiveNorm3d}


def adaptive_norm_factory(dim: int) -> type:
    """MONAI calls this with the network's spatial_dims."""
    if dim not in _BY_SPATIAL_DIMS:
        raise ValueError(f"norm='adaptive' supports spatial_dims 1, 2 or 3, got {dim}.")
    return _BY_SPATIAL_DIMS[dim]


def register() -> None:
    Norm.add_factory_callable("adaptive", adaptive_norm_factory)
