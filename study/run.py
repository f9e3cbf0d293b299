"""The norm study (issue #13): batch size x norm x seed, each cell a short recipe training run, in one process.

    python -m study.run                                   # the hard synthetic grid (STUDY.md), resumable
    python -m study.run --data mni152                     # the MNI152 grid
    python -m study.run --batches 1,16 --norms batch,adaptive --seeds 0 --out study/results/calibration.csv

Every cell composes the recipe's own Hydra config (``adanorm/configs``: model=unet, norm=..., data=...) and
builds the recipe's data module and Lightning module from it, so the data path, network, loss and
validation are exactly ``adanorm-train``'s; only the Trainer is a lean one (no checkpoints, loggers or
plots: they would cost more than a small cell's training). The runs share one process, so the imports and
the kernel build are paid once.

Protocol (the same at every batch size): ``--steps-per-epoch`` optimizer steps per epoch for ``--epochs``
epochs, so every batch size gets the same number of updates (and of running-statistics updates) and larger
batches see proportionally more patches; validation (eval mode, sliding window) after every epoch.

Each finished cell appends one row to ``--out`` (CSV): the final validation Dice in eval mode, the best
over epochs, the Dice with the model in train mode (batch statistics of ``batch`` windows at a time, as in
training), their gap, and the tile mismatch of each ``--norm-stats`` choice when ``adanorm.tiling`` exists.
A cell whose row is already there (same data, protocol, batch, norm and seed) is skipped, so an interrupted
sweep continues where it stopped. ``adaptive+renorm`` is skipped with a message while ``AdaptiveNorm`` has no
``renorm`` argument.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

RESULTS = Path(__file__).resolve().parent / "results"
NORMS = ("batch", "instance", "group", "adaptive", "adaptive+renorm")
BATCHES = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
TILE_MODES = ("tile", "running", "volume")
"""The ``--norm-stats`` choices of tile-consistent inference (``adanorm.tiling``), one mismatch column each."""
TILE_OVERLAP = 0.5
"""The sliding-window overlap of the tile-mismatch measurement: adanorm-predict's default (--overlap)."""
TILE_VOLUMES = 4
"""Validation volumes the tile mismatch is measured on (each costs a few sliding-window passes per choice)."""

NORM_OVERRIDES: Dict[str, List[str]] = {
    "batch": ["norm=batch"],
    "instance": ["norm=instance"],
    "group": ["norm=group"],
    "adaptive": ["norm=adaptive"],
    # Batch Renormalization inside the adaptive layer's batch mode: the adaptive norm config with renorm on.
    "adaptive+renorm": ["norm=adaptive", "norm.args=[adaptive,{preset:default,renorm:true,renorm_warmup_steps:WARMUP}]"],
    # Not in the default grid: the adaptive layer under the named policy "group_first" (group mode with the
    # layer's default group count wherever it can run): the policy change the first grids pointed to.
    "adaptive:group_first": ["norm=adaptive", "norm.args=[adaptive,{preset:default,policy:group_first}]"],
    # Not in the default grid: the default policy with GroupNorm's 4 groups (norm=group's), not the layer's own
    # count: whether the group count explains where the default trails norm=group.
    "adaptive:groups4": ["norm=adaptive", "norm.args=[adaptive,{preset:default,num_groups:4}]"],
}
MIN_BATCH_SIZE_VARIANT = "adaptive:min_batch_size="
"""``adaptive:min_batch_size=N``: the default policy with batch statistics from N samples instead of 32 (the
crossing a grid found), e.g. ``--norms adaptive:min_batch_size=8``."""


def norm_overrides(norm: str) -> List[str]:
    """The Hydra overrides of a ``--norms`` name: NORM_OVERRIDES' entries and ``adaptive:min_batch_size=N``."""
    if norm.startswith(MIN_BATCH_SIZE_VARIANT):
        threshold = int(norm[len(MIN_BATCH_SIZE_VARIANT):])
        return ["norm=adaptive",
                f"norm.args=[adaptive,{{preset:default,policy:{{_target_:adanorm.Policy,min_batch_size:{threshold}}}}}]"]
    return NORM_OVERRIDES[norm]


RENORM_WARMUP_SHARE = 4
"""Renorm's clip limits widen over the first quarter of a cell's steps (WARMUP above). Its default warm-up is
10k steps, past any cell of this study, which would leave renorm at r=1, d=0 (plain batch norm) throughout;
the paper widens them over roughly the first quarter of training too (Ioffe 2017: r_max from 5k to 40k steps
of about 160k)."""


def synthetic_hard_batch(batch: int, steps_per_epoch: int) -> List[str]:
    """32 training volumes, one patch each per step: ``repeats`` makes every batch size run ``steps_per_epoch`` steps."""
    if (steps_per_epoch * batch) % 32:
        raise ValueError(f"--steps-per-epoch {steps_per_epoch} x batch {batch} must be a multiple of the 32 training volumes.")
    return [f"data.batch_size={batch}", "data.samples_per_volume=1", f"data.repeats={steps_per_epoch * batch // 32}"]


def mni152_batch(batch: int, steps_per_epoch: int) -> List[str]:
    """One training volume (the left hemisphere): a batch is ``batch`` patches of it; ``repeats`` is the step count."""
    return ["data.batch_size=1", f"data.samples_per_volume={batch}", f"data.repeats={steps_per_epoch}"]


def video_batch(batch: int, steps_per_epoch: int) -> List[str]:
    """Fresh clips each epoch: ``steps_per_epoch`` full batches of ``batch`` clips (the video data module drops none)."""
    return [f"data.batch_size={batch}", f"data.clips_per_epoch={steps_per_epoch * batch}"]


DATA: Dict[str, Dict[str, Any]] = {
    "synthetic_hard": {"overrides": ["data=synthetic_hard"], "batch": synthetic_hard_batch,
                       "epochs": 6, "steps_per_epoch": 32},
    "mni152": {"overrides": ["data=mni152", "data.patch_size=[32,32,32]"], "batch": mni152_batch,
               "epochs": 10, "steps_per_epoch": 16},
    "synthetic": {"overrides": ["data=synthetic", "data.patch_size=[16,16,16]", "data.volume_size=32"],
                  "batch": lambda batch, steps: [f"data.batch_size={batch}", "data.samples_per_volume=1",
                                                 f"data.repeats={max(1, steps * batch // 26)}"],
                  "epochs": 4, "steps_per_epoch": 26},
    # The video task (issue #21): the recipe's R(2+1)D ResNet classifying moving-digit clips (MP4) by motion.
    "moving_digits": {"model": "r2plus1d", "overrides": ["data=moving_digits"], "batch": video_batch,
                      "epochs": 8, "steps_per_epoch": 16, "batches": (8, 16, 32, 64)},
}
"""Each data set's recipe overrides (``model`` defaults to ``unet``, ``batches`` to BATCHES); the score is the recipe module's own
monitor: Dice for segmentation, accuracy for classification (the ``metric`` column)."""

RENAMED = {"val_dice": "val_score", "val_dice_best": "val_score_best", "train_mode_dice": "train_mode_score",
           "val_dice_per_epoch": "val_score_per_epoch"}
"""Columns of runners before the video task, when every score was a Dice; their rows read as ``metric=dice``."""

FIELDS = ["data", "protocol", "batch", "norm", "seed", "status", "metric", "val_score", "val_score_best", "best_epoch",
          "train_mode_score", "train_eval_gap", "val_score_per_epoch",
          *[f"tile_mismatch_{mode}" for mode in TILE_MODES], *[f"tile_seam_{mode}" for mode in TILE_MODES], "tile_note",
          "steps", "patches_seen", "fit_s", "eval_s", "total_s", "cpu_s", "load_avg", "threads", "torch", "note"]


def upgrade_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """A row of an older runner under today's column names."""
    if "metric" in row:
        return row
    return {"metric": "dice", **{RENAMED.get(key, key): value for key, value in row.items()}}


def renorm_available() -> bool:
    from adanorm import AdaptiveNorm

    return "renorm" in inspect.signature(AdaptiveNorm.__init__).parameters


def tiling_available() -> bool:
    return importlib.util.find_spec("adanorm.tiling") is not None


def protocol_tag(data: str, epochs: int, steps_per_epoch: int, extra: Sequence[str]) -> str:
    """Names the settings a row was measured under: rows of another protocol are never reused or mixed.

    A hash of the composed data and model configs (without what each cell sets: batch, norm, seed) and the
    step counts, so editing a data config (e.g. synthetic_hard.yaml) starts a new protocol too.
    """
    from omegaconf import OmegaConf

    cfg = compose_config([model_override(data), *DATA[data]["overrides"], "output_dir=/tmp/adanorm-study", *extra])
    settings = {key: value for key, value in OmegaConf.to_container(cfg.data, resolve=False).items()
                if key not in ("batch_size", "samples_per_volume", "repeats", "seed")}
    model = OmegaConf.to_container(cfg.model, resolve=False)
    text = json.dumps([settings, model, epochs, steps_per_epoch, list(extra)], sort_keys=True, default=str)
    return f"e{epochs}x{steps_per_epoch}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def model_override(data: str) -> str:
    return f"model={DATA[data].get('model', 'unet')}"


def done_cells(path: Path) -> set:
    if not path.is_file():
        return set()
    with path.open(newline="") as handle:
        return {(row["data"], row["protocol"], int(row["batch"]), row["norm"], int(row["seed"]))
                for row in csv.DictReader(handle) if row["status"] == "ok"}  # failed cells run again


def append_row(path: Path, row: Dict[str, Any]) -> None:
    """Appends under an exclusive lock of a side file, so that shards sharing the CSV never interleave."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"adanorm-study-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _append_row(path, row)


def _append_row(path: Path, row: Dict[str, Any]) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header, rows = reader.fieldnames, list(reader)
        if header != FIELDS:  # a file written by an older runner: rewritten once with today's columns
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(upgrade_row(row) for row in rows)
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
        handle.flush()
        os.fsync(handle.fileno())


def compose_config(overrides: Sequence[str]):
    from hydra import compose, initialize_config_module

    from adanorm.recipes.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_module(config_module="adanorm.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def prepare_data_once(datamodule) -> None:
    """Writes a generated data set under a lock, so that shards starting the same seed do not both write it
    (GeneratedFolder renames its staging folder into place, and the second rename fails)."""
    import fcntl

    lock_path = Path(str(getattr(datamodule, "dataset_dir", datamodule.root))).parent / ".study.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        datamodule.prepare_data()


def dice_of(net, loader, patch_size, num_classes: int, sw_batch_size: int, overlap: float) -> float:
    """Mean foreground Dice over ``loader``'s whole volumes, sliding window as the recipe validates."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot
    from monai.utils import convert_to_tensor

    metric = DiceMetric(include_background=False, reduction="mean")
    with torch.no_grad():
        for batch in loader:
            image = convert_to_tensor(batch["image"], track_meta=False)
            label = convert_to_tensor(batch["label"], track_meta=False)
            logits = sliding_window_inference(image, patch_size, sw_batch_size=sw_batch_size, predictor=net,
                                              overlap=overlap, mode="gaussian")
            metric(one_hot(logits.argmax(1, keepdim=True), num_classes), one_hot(label, num_classes))
    return float(metric.aggregate().item())


def accuracy_of(net, loader) -> float:
    """Share of ``loader``'s clips whose most probable class is their label (batches as the loader gives them)."""
    import torch

    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            correct += int((net(batch["image"]).argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    return correct / total


def score_of(metric: str, net, loader, patch_size, num_classes: int, batch: int, overlap: float) -> float:
    """The validation score with ``batch`` samples per forward (what train-mode statistics are taken over)."""
    if metric == "accuracy":  # the video loader's batches are data.batch_size clips: the training batch
        return accuracy_of(net, loader)
    return dice_of(net, loader, patch_size, num_classes, sw_batch_size=batch, overlap=overlap)


def tile_mismatch(module, loader, patch_size, overlap: float, volumes: int) -> Tuple[Dict[str, Any], str]:
    """Tile mismatch of each ``--norm-stats`` choice, as ``adanorm-predict --tile-report`` measures it.

    For the first ``volumes`` validation volumes: the sliding-window prediction (``overlap``, Gaussian blending)
    with per-sample norm statistics from ``source`` (whole-volume ones gathered over non-overlapping windows
    first), against the whole volume in one window with the same statistics (per-sample ones of the whole
    volume, or the running ones for "running"): ``adanorm.tiling.tile_report``'s mean |tiled − whole| in units
    of the whole-volume logits' sd, and its seam ratio. "running" is left empty (noted) for a network with
    per-sample layers that never learned running statistics (instance, group, adaptive below its batch
    threshold), where ``--norm-stats running`` refuses to run. Empty with a note until ``adanorm.tiling`` exists.
    """
    empty = {f"tile_{kind}_{mode}": None for mode in TILE_MODES for kind in ("mismatch", "seam")}
    if not tiling_available():
        return empty, "adanorm.tiling not available"
    import torch
    from monai.inferers import sliding_window_inference
    from monai.utils import convert_to_tensor

    from adanorm.tiling import norm_statistics, tile_report

    net = module.net.eval()

    def infer(image, window_overlap):
        return sliding_window_inference(image, patch_size, sw_batch_size=4, predictor=net, overlap=window_overlap,
                                        mode="gaussian")

    def whole_volume(image):
        if hasattr(module, "whole_volume"):
            return module.whole_volume(image)
        window = [-(-size // (patch & -patch)) * (patch & -patch) for size, patch in zip(image.shape[2:], patch_size)]
        return sliding_window_inference(image, window, sw_batch_size=1, predictor=net, overlap=0.0)

    sums: Dict[str, List[float]] = {key: [] for key in empty}
    notes = []
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if index >= volumes:
                break
            image = convert_to_tensor(batch["image"], track_meta=False)
            for mode in TILE_MODES:
                try:
                    with norm_statistics(net, mode) as stats:
                        stats.gather(lambda image=image: infer(image, 0.0))
                        tiled = infer(image, overlap)
                    with norm_statistics(net, "running" if mode == "running" else "tile"):
                        whole = whole_volume(image)
                except ValueError as error:  # --norm-stats running without running statistics
                    if index == 0:
                        notes.append(f"{mode}: n/a ({str(error).split(':')[0]})")
                    continue
                report = tile_report(tiled, whole, tuple(patch_size), overlap)
                sums[f"tile_mismatch_{mode}"].append(report.mean_difference)
                sums[f"tile_seam_{mode}"].append(report.seam)
    values = {key: (sum(items) / len(items) if items else None) for key, items in sums.items()}
    return values, "; ".join(notes)


class ScoreHistory:
    """A Lightning callback collecting the module's monitored score (val/dice, val/accuracy) after every validation
    (callbacks' epoch-end hooks run before the module's)."""

    def __new__(cls, monitor: str):
        import lightning.pytorch as pl

        class _History(pl.Callback):
            def __init__(self) -> None:
                self.values: List[float] = []

            def on_validation_end(self, trainer, pl_module) -> None:  # after the module logged its score
                if not trainer.sanity_checking and monitor in trainer.callback_metrics:
                    self.values.append(float(trainer.callback_metrics[monitor]))

        return _History()


def run_cell(data: str, batch: int, norm: str, seed: int, epochs: int, steps_per_epoch: int,
             extra: Sequence[str]) -> Dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate

    from adanorm.policy import FallbackWarning
    from adanorm.recipes.quiet import quiet_third_party

    spec = DATA[data]
    warmup = epochs * steps_per_epoch // RENORM_WARMUP_SHARE
    overrides = [model_override(data), *[item.replace("WARMUP", str(warmup)) for item in norm_overrides(norm)], *spec["overrides"],
                 *spec["batch"](batch, steps_per_epoch),
                 f"seed={seed}", "output_dir=/tmp/adanorm-study", *extra]
    cfg = compose_config(overrides)
    start, cpu_start = time.perf_counter(), time.process_time()
    pl.seed_everything(seed, workers=True, verbose=False)
    with quiet_third_party(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        datamodule = instantiate(cfg.data)
        prepare_data_once(datamodule)
        module = instantiate(cfg.module)
        metric = "accuracy" if module.task == "classification" else "dice"
        history = ScoreHistory(module.monitor)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             callbacks=[history])
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        fit_s = time.perf_counter() - fit_start
        eval_start = time.perf_counter()
        net = module.net.eval()
        loader = datamodule.val_dataloader()
        overlap = module.hparams.get("val_overlap", 0.25) if hasattr(module.hparams, "get") else 0.25
        patch, classes = tuple(cfg.data.patch_size), int(cfg.data.num_classes)
        val_score = score_of(metric, net, loader, patch, classes, batch=4, overlap=overlap)
        # Train mode: batch statistics of `batch` windows (clips) at a time, as the network saw them in training
        # (on a copy, so that no running statistic moves).
        train_net = copy.deepcopy(net).train()
        train_score = score_of(metric, train_net, loader, patch, classes, batch=batch, overlap=overlap)
        if metric == "dice":
            mismatch, tile_note = tile_mismatch(module, loader, patch, TILE_OVERLAP, TILE_VOLUMES)
        else:
            mismatch, tile_note = {}, "whole clips: no tiles"
        eval_s = time.perf_counter() - eval_start
    steps = trainer.global_step
    best = max(range(len(history.values)), key=history.values.__getitem__) if history.values else None
    return {
        "status": "ok", "metric": metric, "val_score": round(val_score, 5),
        "val_score_best": round(history.values[best], 5) if best is not None else "",
        "best_epoch": best if best is not None else "",
        "train_mode_score": round(train_score, 5), "train_eval_gap": round(train_score - val_score, 5),
        "val_score_per_epoch": " ".join(f"{value:.4f}" for value in history.values),
        **{key: ("" if value is None else f"{value:.6g}") for key, value in mismatch.items()},
        "tile_note": tile_note, "steps": steps, "patches_seen": steps * batch, "fit_s": round(fit_s, 2),
        "eval_s": round(eval_s, 2), "total_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(time.process_time() - cpu_start, 2), "load_avg": round(os.getloadavg()[0], 2),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def cells(batches: Iterable[int], norms: Iterable[str], seeds: Iterable[int]) -> List[Tuple[int, str, int]]:
    """Seed-major order: a sweep stopped early holds whole seeds of the grid, not whole batch sizes."""
    return [(batch, norm, seed) for seed in seeds for batch in batches for norm in norms]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic_hard", choices=sorted(DATA))
    parser.add_argument("--batches", default=None, help=f"comma-separated (default: per data set; {','.join(map(str, BATCHES))} "
                        "for the volumes, 8,16,32,64 for moving_digits)")
    parser.add_argument("--norms", default=",".join(NORMS),
                        help="comma-separated, of: " + ", ".join(NORM_OVERRIDES) + f", {MIN_BATCH_SIZE_VARIANT}N")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="default: per data set (synthetic_hard 6, mni152 10, moving_digits 8)")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="default: per data set (synthetic_hard 32, mni152 16, moving_digits 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s; "
                        "on a busy machine one thread per process and --shard beat intra-op threads)")
    parser.add_argument("--out", type=Path, default=RESULTS / "runs.csv", help="the per-run CSV (default: %(default)s)")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th cell from the i-th, so n processes "
                        "(one thread each) share a grid and its CSV (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells to run and exit")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every cell (part of the protocol tag)")
    args = parser.parse_args(argv)
    unknown = [norm for norm in args.norms.split(",") if norm not in NORM_OVERRIDES
               and not (norm.startswith(MIN_BATCH_SIZE_VARIANT) and norm[len(MIN_BATCH_SIZE_VARIANT):].isdigit())]
    if unknown:
        parser.error(f"unknown norms {unknown}; choose from {tuple(NORM_OVERRIDES)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # threads that spin at barriers starve on a shared machine
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    spec = DATA[args.data]
    epochs = args.epochs or spec["epochs"]
    steps = args.steps_per_epoch or spec["steps_per_epoch"]
    protocol = protocol_tag(args.data, epochs, steps, args.overrides)
    batches = args.batches.split(",") if args.batches else spec.get("batches", BATCHES)
    grid = cells([int(b) for b in batches], args.norms.split(","), [int(s) for s in args.seeds.split(",")])
    done = done_cells(args.out)
    shard, shards = (int(part) for part in args.shard.split("/"))
    grid = grid[shard::shards]
    todo = [cell for cell in grid if (args.data, protocol, *cell) not in done]
    renorm = renorm_available()
    print(f"study: data={args.data} protocol={protocol} ({epochs} epochs x {steps} steps), {len(grid)} cells, "
          f"{len(grid) - len(todo)} already in {args.out}, {len(todo)} to run; torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}", flush=True)
    if not renorm and any(norm == "adaptive+renorm" for _, norm, _ in todo):
        print("study: adaptive+renorm skipped: AdaptiveNorm has no renorm argument yet (adanorm/norm.py); "
              "rerun once it has, the finished cells are kept.", flush=True)
    if not tiling_available():
        print("study: tile-mismatch columns left empty: adanorm.tiling is not there yet.", flush=True)
    if args.dry_run:
        for cell in todo:
            print("  batch={} norm={} seed={}".format(*cell))
        return 0
    build = time.perf_counter()
    from adanorm.functional.dispatch import cpu_kernels

    cpu_kernels()  # built (or loaded) once before the first cell, so no cell's time includes the build
    print(f"study: adanorm CPU kernels ready in {time.perf_counter() - build:.1f} s", flush=True)
    failures = 0
    bar = tqdm(todo, desc=f"{args.data} cells", unit="cell", file=sys.stderr, mininterval=5, dynamic_ncols=False)
    for batch, norm, seed in bar:
        bar.set_postfix_str(f"batch={batch} {norm} seed={seed}")
        if norm == "adaptive+renorm" and not renorm:
            continue  # not recorded: runs once renorm exists
        row: Dict[str, Any] = {"data": args.data, "protocol": protocol, "batch": batch, "norm": norm, "seed": seed}
        try:
            row.update(run_cell(args.data, batch, norm, seed, epochs, steps, args.overrides))
        except Exception as error:  # recorded, so the sweep goes on; the report shows failed cells
            failures += 1
            row.update(status="failed", note=f"{type(error).__name__}: {error}"[:300], torch=torch.__version__)
            traceback.print_exc()
        append_row(args.out, row)
        tqdm.write(f"batch={batch:>2} {norm:<16} seed={seed}: {row['status']} {row.get('metric', '')} "
                   f"{row.get('val_score', '')} train_mode={row.get('train_mode_score', '')} "
                   f"fit {row.get('fit_s', '')} s, eval {row.get('eval_s', '')} s",
                   file=sys.stderr)
    bar.close()
    print(f"study: finished; {failures} failed cells; rows in {args.out}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
