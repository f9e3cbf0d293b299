"""The training run behind ``train.py``: everything is built from the composed Hydra config.

Resuming (``ckpt_path=<run>/checkpoints/last.ckpt``) continues the run in its own folder: Hydra's run
folder is derived from the checkpoint (``adanorm.recipes.resolvers``), so both checkpoint callbacks
reload their state (the best epoch is tracked across the resume), ``csv/metrics.csv`` is appended to
and the plots cover every epoch.
"""
from __future__ import annotations

import csv
import importlib.util
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from adanorm.integrations.lightning import RecalibrateNorms
from adanorm.policy import FallbackWarning
from adanorm.recipes.plots import save_run_plots
from adanorm.recipes.quiet import quiet_third_party
from adanorm.recipes.resolvers import CONFIG_FOLDER, register_resolvers, resumed_run_dir

register_resolvers()  # configs composed through Hydra's compose API resolve too


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A recipe checkpoint's contents, loaded as every user file is: ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


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
            epoch = load_checkpoint(self.resume_from)["epoch"] if self.resume_from else None
            self._experiment = _AppendingExperimentWriter(self.log_dir, keep_through_epoch=epoch)
        return super().experiment


def csv_and_tensorboard_loggers(save_dir: str, resume_from: Optional[str] = None) -> List[Logger]:
    """CSV always (the plots are drawn from it); TensorBoard too when it is installed."""
    loggers: List[Logger] = [ResumableCSVLogger(save_dir, name="csv", version="", resume_from=resume_from)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(save_dir, name="tensorboard", version=""))
    return loggers


def _differences(saved: Any, wanted: Any, key: str = "") -> List[str]:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return [line for name in sorted(set(saved) | set(wanted), key=str)
                for line in _differences(saved.get(name), wanted.get(name), f"{key}.{name}" if key else str(name))]
    return [] if saved == wanted else [f"{key}: {saved!r} in the checkpoint, {wanted!r} now"]


def check_resume(cfg: DictConfig) -> None:
    """Stops a resume whose config builds another network than the checkpoint's, naming the first run's overrides."""
    if not Path(cfg.ckpt_path).expanduser().is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} is not a file; pass a checkpoint of a run, "
                                f"e.g. ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt.")
    checkpoint = load_checkpoint(str(Path(cfg.ckpt_path).expanduser()))
    saved = checkpoint.get("hyper_parameters", {}).get("net")
    wanted = OmegaConf.to_container(cfg.module.net, resolve=True)
    if saved is None or saved == wanted:
        return
    run = resumed_run_dir(cfg.ckpt_path)
    first = run / CONFIG_FOLDER / "overrides.yaml" if run is not None else None
    hint = (f"the first run's overrides ({' '.join(OmegaConf.load(first))})" if first is not None and first.is_file()
            else "the first run's overrides")
    raise ValueError(
        f"ckpt_path={cfg.ckpt_path} holds another network than this config builds ("
        + "; ".join(_differences(saved, wanted)) + f"). Resume with {hint} plus ckpt_path= and trainer.max_epochs=."
    )


def train(cfg: DictConfig) -> Optional[float]:
    """Fits the configured model and returns the best validation score (what a sweep compares)."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.ckpt_path:
        check_resume(cfg)
    with quiet_third_party(resuming=bool(cfg.ckpt_path)), warnings.catch_warnings():
        # NormModeMonitor counts every fallback and norm_modes.png shows them; one warning per layer is noise here.
        warnings.simplefilter("ignore", FallbackWarning)
        datamodule = instantiate(cfg.data)
        module = instantiate(cfg.module)
        trainer: pl.Trainer = instantiate(cfg.trainer)
        if cfg.recalibrate:
            trainer.callbacks.append(RecalibrateNorms(num_batches=cfg.recalibrate_batches))
        # weights_only=True: a checkpoint is a user file (issue #12); the recipes write nothing it refuses.
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
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
