"""The training run behind ``train.py``: everything is built from the composed Hydra config.

Resuming (``ckpt_path=<run>/checkpoints/last.ckpt``) continues the run in its own folder, with its config
(``adanorm.recipes.resume``): Hydra's run folder is derived from the checkpoint (``adanorm.recipes.resolvers``),
so both checkpoint callbacks reload their state (the best epoch is tracked across the resume),
``csv/metrics.csv`` is appended to and the plots cover every epoch.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, List, Optional, Set

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from adanorm.integrations.lightning import RecalibrateNorms
from adanorm.policy import FallbackWarning
from adanorm.recipes.checkpoint import read_checkpoint
from adanorm.recipes.errors import ConfigError
from adanorm.recipes.plots import save_run_plots
from adanorm.recipes.quiet import quiet_third_party
from adanorm.recipes.resolvers import register_resolvers, resumed_run_dir
from adanorm.recipes.resume import RESUMABLE, FirstRun, checkpoint_file, differences

register_resolvers()  # configs composed through Hydra's compose API resolve too


class _AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is continued instead of deleted.

    Rows past ``keep_through_epoch`` (logged after the checkpoint a run resumes from) are dropped first,
    so an epoch never appears twice.
    """

    def __init__(self, log_dir: str, keep_through_epoch: Optional[int] = None) -> None:
        self.keep_through_epoch = keep_through_epoch
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            keys, rows = list(reader.fieldnames or ()), list(reader)
        self.metrics_keys = keys
        if self.keep_through_epoch is None:
            return
        kept = [row for row in rows if not row.get("epoch") or int(float(row["epoch"])) <= self.keep_through_epoch]
        if len(kept) != len(rows):
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)


class ResumableCSVLogger(CSVLogger):
    """A ``CSVLogger`` that appends to the ``metrics.csv`` already in its folder (a resumed run's).

    ``resume_from``: the checkpoint the run resumes from; rows logged after it are dropped.
    """

    def __init__(self, *args: Any, resume_from: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_from = resume_from

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and getattr(rank_zero_only, "rank", 0) == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            epoch = read_checkpoint(self.resume_from)["epoch"] if self.resume_from else None
            self._experiment = _AppendingExperimentWriter(self.log_dir, keep_through_epoch=epoch)
        return super().experiment


def csv_and_tensorboard_loggers(save_dir: str, resume_from: Optional[str] = None) -> List[Logger]:
    """CSV always (the plots are drawn from it); TensorBoard too when it is installed."""
    loggers: List[Logger] = [ResumableCSVLogger(save_dir, name="csv", version="", resume_from=resume_from)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(save_dir, name="tensorboard", version=""))
    return loggers


def check_resume(cfg: DictConfig) -> None:
    """Refuses a resume that would train something else than the run it continues (``adanorm.recipes.resume``).

    A checkpoint in a run folder is compared with that run's composed config; one outside a run folder, which
    starts a new run from its weights, with the network its hyper-parameters describe.
    """
    checkpoint = checkpoint_file(cfg.ckpt_path)
    run = resumed_run_dir(cfg.ckpt_path)
    first = FirstRun.read(run) if run is not None else None
    if first is not None:
        hydra = HydraConfig.get() if HydraConfig.initialized() else None
        choices = OmegaConf.to_container(hydra.runtime.choices) if hydra is not None else None
        changes = first.differences(cfg, choices, str(hydra.runtime.cwd) if hydra is not None else os.getcwd())
    else:
        saved = read_checkpoint(checkpoint).get("hyper_parameters", {}).get("net")
        wanted = OmegaConf.to_container(cfg.module.net, resolve=True)
        changes = [] if saved is None else differences(saved, wanted, key="net")
    if changes:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} continues a run that trained something else ({'; '.join(changes)}). A resumed "
            f"run keeps its data, model, norm and task: drop these overrides, or leave out ckpt_path= to start a new "
            f"run with them. A resume may change {RESUMABLE}."
        )


def _remove_outputs_of_unstarted_run(output_dir: Path, existing: Set[Path]) -> None:
    """Removes what a new run created in ``output_dir`` besides what was there when it began (Hydra's ``.hydra``
    and ``train.log``, which holds the error), so that a run that never trained does not look like one."""
    for path in set(output_dir.iterdir()) - existing if output_dir.is_dir() else ():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # another DDP rank may be removing it too
        else:
            path.unlink(missing_ok=True)


def train(cfg: DictConfig) -> Optional[float]:
    """Fits the configured model and returns the best validation score (what a sweep compares).

    Every config value is resolved first, so that a config mistake stops the run before anything is built. A new
    run that fails before its first training step leaves only what it began with (``_remove_outputs_of_unstarted_run``);
    a resumed run's folder is left as it is.
    """
    output_dir = Path(cfg.output_dir)
    existing = set(output_dir.iterdir()) if output_dir.is_dir() else set()
    trainer: Optional[pl.Trainer] = None
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        if cfg.ckpt_path:
            check_resume(cfg)
        pl.seed_everything(cfg.seed, workers=True)
        with quiet_third_party(resuming=bool(cfg.ckpt_path)), warnings.catch_warnings():
            # NormModeMonitor counts every fallback and norm_modes.png shows them; one warning per layer is noise here.
            warnings.simplefilter("ignore", FallbackWarning)
            datamodule = instantiate(cfg.data)
            module = instantiate(cfg.module)
            if cfg.get("channels_last"):
                module.use_channels_last()
            trainer = instantiate(cfg.trainer)
            if cfg.recalibrate:
                trainer.callbacks.append(RecalibrateNorms(num_batches=cfg.recalibrate_batches))
            # weights_only=True: a checkpoint is a user file (issue #12); the recipes write nothing it refuses.
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except BaseException:
        if resumed_run_dir(cfg.ckpt_path) is None and (trainer is None or trainer.global_step == 0):
            _remove_outputs_of_unstarted_run(output_dir, existing)
        raise
    checkpoint = trainer.checkpoint_callback
    best_score = None if checkpoint is None or checkpoint.best_model_score is None else checkpoint.best_model_score.item()
    csv_logs = [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]
    if not (trainer.is_global_zero and csv_logs):  # other DDP ranks, and fast_dev_run (which writes no logs)
        return best_score
    plots = save_run_plots(Path(csv_logs[0].log_dir) / "metrics.csv", Path(cfg.output_dir), module.monitor)
    print("plots:", ", ".join(str(path) for path in plots))
    if best_score is not None:
        print(f"best {module.monitor} {best_score:.4f}: {checkpoint.best_model_path}")
    return best_score
