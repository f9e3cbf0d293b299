"""The summary of an ``adanorm-train -m`` sweep: each job's overrides, best validation score, its epoch and folder.

``SweepSummary`` is a Hydra callback (``hydra.callbacks`` in ``train.yaml``). Each job appends its row to
``sweep_summary.csv`` in the sweep folder as it ends, wherever a launcher runs it, so a sweep that stops
early keeps the rows of the jobs that ended; when the sweep ends the table is printed. The best score and
its epoch are read from the job's ``csv/metrics.csv``, by the rule that picks its best checkpoint (the
checkpoint callback's ``mode`` for the task's ``monitor``). Nothing beyond Hydra and the standard library is
imported, since Hydra builds the callback for every run.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

SUMMARY_FILE = "sweep_summary.csv"
COLUMNS = ("job", "overrides", "monitor", "best", "epoch", "status", "run_dir")


def best_epoch(metrics_csv: Path, monitor: str, mode: str = "max") -> Optional[Tuple[float, int]]:
    """The best ``monitor`` value in a Lightning ``metrics.csv`` and its epoch (the first one, on ties, as
    ``ModelCheckpoint`` keeps it); None when nothing was validated."""
    if not metrics_csv.is_file():
        return None
    with metrics_csv.open(newline="") as handle:
        scores = [(float(row[monitor]), int(float(row["epoch"]))) for row in csv.DictReader(handle) if row.get(monitor)]
    if not scores:
        return None
    pick = max if mode == "max" else min
    return pick(scores, key=lambda score: score[0])  # max/min return the first of equal scores


def _checkpoint_mode(config: DictConfig, monitor: str) -> str:
    callbacks = config.trainer.get("callbacks") or []
    return next((str(callback.get("mode", "min")) for callback in callbacks if callback.get("monitor") == monitor), "max")


def _varying(rows: List[Dict[str, str]]) -> List[str]:
    """Each row's overrides less those every row shares (all of them for a single job)."""
    split = [row["overrides"].split() for row in rows]
    shared = set.intersection(*map(set, split)) if len(split) > 1 else set()
    return [" ".join(word for word in words if word not in shared) for words in split]


def format_table(rows: List[Dict[str, str]]) -> str:
    """The rows as aligned text columns, scores to four decimals."""
    header = ("overrides", "monitor", "best", "epoch", "run")
    lines = [header] + [
        (overrides or "-", row["monitor"], f"{float(row['best']):.4f}" if row["best"] else row["status"],
         row["epoch"] or "-", row["run_dir"])
        for overrides, row in zip(_varying(rows), rows)
    ]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


class SweepSummary(Callback):
    """Writes ``sweep_summary.csv`` in the sweep folder row by row, and prints it as a table when the sweep ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A reused hydra.sweep.dir gets its jobs' folders rewritten; its summary starts over with them.
        (Path(config.hydra.sweep.dir) / SUMMARY_FILE).unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        monitor = str(config.task.monitor)
        best = best_epoch(run_dir / "csv" / "metrics.csv", monitor, _checkpoint_mode(config, monitor))
        row = {
            "job": config.hydra.job.num,
            "overrides": " ".join(job_return.overrides or ()),
            "monitor": monitor,
            "best": "" if best is None else best[0],
            "epoch": "" if best is None else best[1],
            "status": job_return.status.name.lower(),
            "run_dir": run_dir,
        }
        summary = Path(config.hydra.sweep.dir) / SUMMARY_FILE
        is_new = not summary.is_file()
        with summary.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            if is_new:
                writer.writeheader()
            writer.writerow(row)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = Path(config.hydra.sweep.dir) / SUMMARY_FILE
        if not summary.is_file():
            return
        with summary.open(newline="") as handle:
            rows = sorted(csv.DictReader(handle), key=lambda row: int(row["job"]))
        print(f"sweep summary ({summary}):\n{format_table(rows)}")
