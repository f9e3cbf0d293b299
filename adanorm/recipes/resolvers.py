"""OmegaConf resolvers the recipe configs use (``${adanorm.<name>:...}``).

``train.py`` registers them before Hydra composes; ``adanorm.recipes.run`` registers them on import,
so configs composed through Hydra's compose API resolve too. Only OmegaConf and Hydra's error classes are
imported here, so registering costs nothing at start-up. A resolver refuses a setting with ``ConfigError``,
which the commands print as one line (``adanorm.recipes.errors``).
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from adanorm.recipes.errors import ConfigError

CHECKPOINT_FOLDER = "checkpoints"
CONFIG_FOLDER = ".hydra"
NORMS_WITHOUT_RUNNING_STATS = ("instance", "group")


def resumed_run_dir(ckpt_path: Optional[str]) -> Optional[Path]:
    """The run folder ``ckpt_path`` belongs to (``<run>/checkpoints/x.ckpt`` with ``<run>/.hydra``), else None."""
    if not ckpt_path:
        return None
    checkpoint = Path(str(ckpt_path)).expanduser().resolve()
    run = checkpoint.parent.parent
    if checkpoint.parent.name == CHECKPOINT_FOLDER and (run / CONFIG_FOLDER).is_dir():
        return run
    return None


def run_dir(ckpt_path: Optional[str], new_run_dir: str) -> str:
    """``hydra.run.dir``: a resumed run continues in its own folder; any other run gets ``new_run_dir``."""
    run = resumed_run_dir(ckpt_path)
    return str(run) if run is not None else new_run_dir


def config_subdir(ckpt_path: Optional[str]) -> str:
    """``hydra.output_subdir``: ``.hydra``, or for a resumed run ``.hydra/resumed-<time>``, so the first config stays."""
    if resumed_run_dir(ckpt_path) is None:
        return CONFIG_FOLDER
    return f"{CONFIG_FOLDER}/resumed-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def batch_norm_momentum(preset: Optional[str]) -> Optional[float]:
    """``norm=batch``: the momentum of an adanorm momentum preset, as native ``BatchNorm3d(momentum=...)`` takes it.

    ``cumulative`` is PyTorch's ``momentum=None``; ``auto`` follows the batch size, which a native layer cannot.
    """
    from adanorm.presets import get_preset  # the core package, imported only when a batch-norm config resolves

    if preset is None:
        return get_preset("default").momentum
    chosen = get_preset(str(preset))
    if chosen.window_samples is not None:
        raise ConfigError(
            f"norm.preset={preset} sets the momentum from each step's batch size, which native BatchNorm3d "
            f"(norm=batch) cannot do; use norm=adaptive norm.preset={preset}, or with norm=batch one of the fixed "
            f"presets: default, small_batch, tiny_batch, cumulative."
        )
    return chosen.momentum


def norm_without_presets(norm: str, preset: Optional[str]) -> str:
    """Returns ``norm`` (instance, group), refusing a momentum preset: these norms keep no running statistics."""
    if preset is not None:
        raise ConfigError(
            f"norm={norm} keeps no running statistics, so norm.preset={preset} has nothing to set; drop "
            f"norm.preset, or choose a norm with running statistics: norm=adaptive or norm=batch."
        )
    return norm


RESOLVERS = {
    "adanorm.run_dir": run_dir,
    "adanorm.config_subdir": config_subdir,
    "adanorm.batch_norm_momentum": batch_norm_momentum,
    "adanorm.norm_without_presets": norm_without_presets,
}


def register_resolvers() -> None:
    """Registers every ``adanorm.*`` resolver (again: safe to call more than once)."""
    for name, resolver in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)
