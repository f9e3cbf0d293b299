"""Seconds per training epoch of each recipe model (issue #15), with the default data settings.

    python -m benchmarks.epoch_time                          # unet, basic_unet, dynunet, segresnet, resnet
    python -m benchmarks.epoch_time --models unet resnet     # a subset
    python -m benchmarks.epoch_time --epochs 3 norm=batch    # time more epochs; trailing args are Hydra overrides

Each model trains through the recipe's own config (``adanorm-train model=<name>``: default data, norm, trainer
and callbacks), for one warm-up epoch and then ``--epochs`` timed ones; the table gives the median of the
timed epochs, split into the training steps and the validation pass that ends each epoch. The synthetic
volumes are written once, before any timing, into ``--data-root`` (a temporary folder unless given) and every
model reads the same ones. Prints a Markdown table; times are wall-clock on this machine with torch's default
thread count, so they move with the machine's load.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

MODELS = ("unet", "basic_unet", "dynunet", "segresnet", "resnet")


def _timer_callback():
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        """Wall time of each training epoch and of the validation pass inside it (Lightning validates
        between the last training step and ``on_train_epoch_end``)."""

        def __init__(self) -> None:
            self.epoch: List[float] = []
            self.validation: List[float] = []
            self.steps: List[int] = []
            self._validation = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._validation = 0.0
            self._start = time.perf_counter()

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            self._validation_start = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self._validation += time.perf_counter() - self._validation_start

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.epoch.append(time.perf_counter() - self._start)
            self.validation.append(self._validation)
            self.steps.append(trainer.num_training_batches)

    return EpochTimer()


def compose(model: str, data_root: Path, output_dir: Path, epochs: int, overrides: Sequence[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from adanorm.recipes.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_module(config_module="adanorm.configs", version_base="1.3"):
        return hydra_compose("train", overrides=[
            f"model={model}", f"data.root={data_root}", f"data.label_cache={data_root}/label_checks.json",
            f"output_dir={output_dir}", f"trainer.max_epochs={1 + epochs}", "+trainer.enable_progress_bar=false",
            *overrides])


def time_model(model: str, data_root: Path, output_dir: Path, epochs: int, overrides: Sequence[str]) -> Dict[str, float]:
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from adanorm.policy import FallbackWarning
    from adanorm.recipes.quiet import quiet_third_party

    cfg = compose(model, data_root, output_dir, epochs, overrides)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    with quiet_third_party(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()  # writes the volumes the first time: never inside a timed epoch
        module = instantiate(cfg.module)
        trainer: pl.Trainer = instantiate(cfg.trainer)
        timer = _timer_callback()
        trainer.callbacks.append(timer)
        trainer.fit(module, datamodule=datamodule)
    timed = slice(1, None)  # epoch 0 warms up (caches, compiled kernels, allocator)
    epoch = statistics.median(timer.epoch[timed])
    validation = statistics.median(timer.validation[timed])
    return {"epoch": epoch, "train": epoch - validation, "validation": validation, "steps": timer.steps[-1],
            "parameters": sum(p.numel() for p in module.parameters())}


def table(results: Dict[str, Dict[str, float]], epochs: int) -> str:
    lines = [f"| model | parameters | steps/epoch | training s/epoch | validation s/epoch | s/epoch (median of {epochs}) |",
             "|---|---|---|---|---|---|"]
    for model, r in results.items():
        lines.append(f"| {model} | {r['parameters'] / 1e6:.2f} M | {r['steps']} | {r['train']:.2f} | "
                     f"{r['validation']:.2f} | **{r['epoch']:.2f}** |")
    return "\n".join(lines)


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs after the warm-up epoch (default: 1)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="where the synthetic volumes go (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every model, e.g. norm=batch")
    args = parser.parse_args(argv)

    import torch

    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="adanorm-epoch-time-") as scratch:
        data_root = args.data_root or Path(scratch) / "data"
        results = {}
        for model in args.models:
            results[model] = time_model(model, data_root, Path(scratch) / model, args.epochs, args.overrides)
            print(f"{model}: {results[model]['epoch']:.2f} s/epoch", file=sys.stderr, flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, "
          f"overrides: {' '.join(args.overrides) or 'none'}; 1-minute load average {load_before} before, {_load()} after "
          f"(above the core count, other processes took CPU time from these runs)\n")
    print(table(results, args.epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
