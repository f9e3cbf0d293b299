"""The training run behind ``train.py``: everything is built from the composed Hydra config."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import List, Optional

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig

from adanorm.policy import FallbackWarning
from adanorm.recipes.plots import save_run_plots


def csv_and_tensorboard_loggers(save_dir: str) -> List[Logger]:
    """CSV always (the plots are drawn from it); TensorBoard too when it is installed."""
    loggers: List[Logger] = [CSVLogger(save_dir, name="csv", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(save_dir, name="tensorboard", version=""))
    return loggers


def train(cfg: DictConfig) -> Optional[float]:
    """Fits the configured model and returns the best validation score (what a sweep compares)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    trainer: pl.Trainer = instantiate(cfg.trainer)
    with warnings.catch_warnings():
        # NormModeMonitor counts every fallback and norm_modes.png shows them; one warning per layer is noise here.
        warnings.simplefilter("ignore", FallbackWarning)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
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
