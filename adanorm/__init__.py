"""adanorm: normalization layers for small-batch 3D networks that never break on any shape."""
from adanorm.convert import convert, revert
from adanorm.norm import AdaptiveNorm, AdaptiveNorm1d, AdaptiveNorm2d, AdaptiveNorm3d
from adanorm.norm_act import AdaptiveNormAct, AdaptiveNormAct1d, AdaptiveNormAct2d, AdaptiveNormAct3d
from adanorm.policy import (
    MODES,
    NAMED_POLICIES,
    FallbackError,
    FallbackWarning,
    NonFiniteStatsWarning,
    Policy,
    choose_mode,
    get_policy,
)
from adanorm.presets import PRESETS, MomentumPreset, get_preset
from adanorm.recalibration import update_bn
from adanorm.tiling import NormStatistics, TileReport, norm_statistics, tile_report

__all__ = [
    "AdaptiveNorm", "AdaptiveNorm1d", "AdaptiveNorm2d", "AdaptiveNorm3d",
    "AdaptiveNormAct", "AdaptiveNormAct1d", "AdaptiveNormAct2d", "AdaptiveNormAct3d",
    "Policy", "NAMED_POLICIES", "get_policy", "choose_mode", "MODES", "FallbackError", "FallbackWarning",
    "NonFiniteStatsWarning",
    "PRESETS", "MomentumPreset", "get_preset", "convert", "revert", "update_bn",
    "norm_statistics", "NormStatistics", "tile_report", "TileReport",
]
__version__ = "0.1.0"

from adanorm.integrations import monai as _monai_integration

# "adaptive" in MONAI's norm factory whenever MONAI is (or later gets) imported; MONAI itself is not imported here.
_monai_integration.register_when_imported()
