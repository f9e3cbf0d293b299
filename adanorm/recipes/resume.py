"""Resuming continues the run it names, with that run's config.

``adanorm-train ckpt_path=<run>/checkpoints/last.ckpt ...`` composes the first run's config: ``train_main`` puts
the first run's overrides (``<run>/.hydra/overrides.yaml``) ahead of the command line's, so Hydra composes the
same config groups and values, and what is given now applies on top. Hydra writes the result to
``<run>/.hydra/resumed-<time>/``. ``check_resume`` (``adanorm.recipes.run``) then compares it with the first
run's ``config.yaml`` and refuses any difference outside ``RESUMABLE_KEYS``: a resumed run trains the same
network on the same data for the same task, so that its best checkpoint compares like with like.

Only OmegaConf and Hydra's override parser are imported here: ``adanorm-train`` runs this before composing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from adanorm.recipes.resolvers import CONFIG_FOLDER, resumed_run_dir

RESUMABLE_KEYS = (
    "trainer",              # epochs, devices, accelerator, strategy, logging cadence: how the run executes
    "ckpt_path", "verbose", "channels_last",
    "recalibrate", "recalibrate_batches",
    "data.num_workers", "data.cache_rate",        # how the volumes are loaded,
    "data.check_labels", "data.label_cache",      # and checked, not which volumes: every other data key is
)                                                 # the data set (seed too: it splits training from validation)
RESUMABLE_GROUPS = ("trainer",)  # and Hydra's own groups (hydra/...)
RESUMABLE = ", ".join(f"{key}.*" if key in RESUMABLE_GROUPS else key for key in RESUMABLE_KEYS)  # for messages
PATH_KEYS = ("data.root",)  # relative paths are compared as the folder they name from each run's working directory


def checkpoint_file(ckpt_path: str) -> Path:
    """``ckpt_path`` as a path, refusing one that is not a file before anything is composed or created."""
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a file; pass a checkpoint of a run, "
                                f"e.g. ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt.")
    return path


def with_first_run_overrides(overrides: Sequence[str]) -> List[str]:
    """The command line's overrides behind those of the run that ``ckpt_path=`` resumes, when it names one.

    An override given now replaces the first run's for the same key; one the first run appended (``+key=``)
    stays appendable (``++key=``), so repeating the first command with ``ckpt_path=`` added composes.
    """
    parser = OverridesParser.create()
    try:
        given = parser.parse_overrides(list(overrides))
    except OverrideParseException:
        return list(overrides)  # Hydra reports it, naming the override
    ckpt_paths = [override for override in given if override.key_or_group == "ckpt_path"]
    if not ckpt_paths or ckpt_paths[-1].is_sweep_override():
        return list(overrides)
    ckpt_path = ckpt_paths[-1].value()
    if not isinstance(ckpt_path, str) or "${" in ckpt_path:  # null, or resolved only once composed
        return list(overrides)
    checkpoint_file(ckpt_path)
    run = resumed_run_dir(ckpt_path)
    saved = run / CONFIG_FOLDER / "overrides.yaml" if run is not None else None
    if saved is None or not saved.is_file():
        return list(overrides)
    first = {(override.key_or_group, override.package): override
             for override in parser.parse_overrides([str(line) for line in OmegaConf.load(saved)])}
    given_keys = {(override.key_or_group, override.package) for override in given}
    kept = [override.input_line for key, override in first.items() if key not in given_keys]
    return kept + [_appendable(override, first.get((override.key_or_group, override.package))) for override in given]


def _appendable(override: Override, first: Optional[Override]) -> str:
    """``override`` as given, or as ``++key=value`` where it changes a key the first run appended."""
    if override.type == OverrideType.CHANGE and first is not None and first.type in (OverrideType.ADD, OverrideType.FORCE_ADD):
        return f"++{override.input_line}"
    return override.input_line


@dataclass
class FirstRun:
    """What a run folder records of the run that made it: its composed config, config-group choices and
    working directory (``.hydra/config.yaml`` and ``hydra.yaml``)."""

    config: Dict[str, Any]
    choices: Dict[str, Any]
    cwd: str

    @classmethod
    def read(cls, run: Path) -> Optional["FirstRun"]:
        folder = run / CONFIG_FOLDER
        if not (folder / "config.yaml").is_file() or not (folder / "hydra.yaml").is_file():
            return None
        runtime = OmegaConf.load(folder / "hydra.yaml").hydra.runtime
        config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=False)
        return cls(config, OmegaConf.to_container(runtime.choices), str(runtime.cwd))

    def differences(self, cfg: DictConfig, choices: Optional[Mapping[str, Any]], cwd: str) -> List[str]:
        """What ``cfg`` (composed in ``cwd``, from config groups ``choices`` when known) changes that a resume may not.

        Values are compared as written (interpolations unresolved), so a changed key is named once, where it was set.
        """
        changed_groups = [] if choices is None else [
            group for group in sorted(set(self.choices) | set(choices))
            if not group.startswith("hydra/") and group not in RESUMABLE_GROUPS
            and self.choices.get(group) != choices.get(group)
        ]
        lines = [f"{group}={self.choices.get(group)} in the first run, {group}={choices.get(group)} now"
                 for group in changed_groups]
        skipped = (*RESUMABLE_KEYS, *changed_groups)  # a changed group's keys all differ; its choice says it
        first = _with_absolute_paths(self.config, self.cwd)
        wanted = _with_absolute_paths(OmegaConf.to_container(cfg, resolve=False), cwd)
        return lines + differences(first, wanted, skipped)


def differences(first: Any, now: Any, skipped: Sequence[str] = (), key: str = "") -> List[str]:
    """``key: <first run's value> in the first run, <value> now`` for every leaf that differs, except under ``skipped``."""
    if key in skipped:
        return []
    if isinstance(first, dict) and isinstance(now, dict):
        return [line for name in sorted(set(first) | set(now), key=str)
                for line in differences(first.get(name), now.get(name), skipped, f"{key}.{name}" if key else str(name))]
    return [] if first == now else [f"{key}: {first!r} in the first run, {now!r} now"]


def _with_absolute_paths(config: Dict[str, Any], cwd: str) -> Dict[str, Any]:
    config = dict(config)
    for key in PATH_KEYS:
        group, name = key.split(".")
        value = (config.get(group) or {}).get(name)
        if isinstance(value, str) and "${" not in value:
            config[group] = {**config[group], name: os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))}
    return config
