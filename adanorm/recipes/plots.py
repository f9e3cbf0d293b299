"""The run's PNGs, drawn from the CSV log so that a plot shows exactly what was logged."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from adanorm.policy import MODES  # noqa: E402

MODE_COLORS = {"batch": "#1f77b4", "instance": "#ff7f0e", "group": "#2ca02c", "layer": "#d62728", "identity": "#7f7f7f"}
STAGES = ("train", "eval")


def read_metrics(metrics_csv: Path) -> List[Dict[str, float]]:
    """Lightning's CSVLogger rows, with empty cells dropped and values as floats."""
    with Path(metrics_csv).open(newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)} for row in csv.DictReader(handle)]


def _per_epoch(rows: List[Dict[str, float]], key: str) -> Dict[int, float]:
    return {int(row["epoch"]): row[key] for row in rows if key in row and "epoch" in row}


def plot_curves(rows: List[Dict[str, float]], monitor: str, path: Path) -> Path:
    """Training and validation loss next to the validation score, per epoch."""
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("train/loss_epoch", "train"), ("val/loss", "validation")):
        curve = _per_epoch(rows, key)
        loss_axis.plot(list(curve), list(curve.values()), marker=".", label=label)
    loss_axis.set(title="loss", xlabel="epoch")
    loss_axis.legend()
    score = _per_epoch(rows, monitor)
    score_axis.plot(list(score), list(score.values()), marker=".", color="tab:green")
    if score:
        best_epoch = max(score, key=score.get)
        score_axis.annotate(f"best {score[best_epoch]:.3f}", (best_epoch, score[best_epoch]),
                            textcoords="offset points", xytext=(-40, -15))
    score_axis.set(title=monitor, xlabel="epoch", ylim=(0, 1))
    for axis in (loss_axis, score_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def mode_fractions(rows: List[Dict[str, float]], stage: str, prefix: str = "norm") -> Dict[str, Dict[str, float]]:
    """Per layer, the share of the run's forwards that ran each mode (from NormModeMonitor's counts)."""
    counts: Dict[str, Dict[str, float]] = defaultdict(lambda: dict.fromkeys(MODES, 0.0))
    head = f"{prefix}/{stage}/"
    for row in rows:
        for key, value in row.items():
            if not key.startswith(head):
                continue
            layer, _, mode = key[len(head):].rpartition("/")
            if mode in MODES:
                counts[layer][mode] += value
    return {layer: {mode: n / max(sum(c.values()), 1.0) for mode, n in c.items()} for layer, c in counts.items()}


def plot_norm_modes(rows: List[Dict[str, float]], path: Path, prefix: str = "norm") -> Path:
    """One bar per adaptive layer (input to output), split by the share of forwards in each mode."""
    fractions = {stage: mode_fractions(rows, stage, prefix) for stage in STAGES}
    layers = list(fractions["train"] or fractions["eval"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 1.6 + 0.28 * len(layers)), sharey=True)
    for axis, stage in zip(axes, STAGES):
        left = [0.0] * len(layers)
        for mode in MODES:
            widths = [fractions[stage].get(layer, {}).get(mode, 0.0) for layer in layers]
            axis.barh(range(len(layers)), widths, left=left, color=MODE_COLORS[mode], label=mode)
            left = [a + b for a, b in zip(left, widths)]
        fell_back = list(_per_epoch(rows, f"{prefix}/{stage}/fallback_fraction").values())
        share = f", {sum(fell_back) / len(fell_back):.0%} fell back" if fell_back else ""
        axis.set(title=f"{stage} forwards{share}", xlim=(0, 1), xlabel="fraction of forwards")
    axes[0].set_yticks(range(len(layers)), [layer.removeprefix("net.") for layer in layers], fontsize=7)
    axes[0].invert_yaxis()
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(MODES), fontsize=8, frameon=False)
    figure.suptitle("adanorm: the mode each layer ran (input at the top)")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_run_plots(metrics_csv: Path, output_dir: Path, monitor: str) -> List[Path]:
    """``curves.png`` always; ``norm_modes.png`` when the model has adaptive layers."""
    rows = read_metrics(metrics_csv)
    written = [plot_curves(rows, monitor, Path(output_dir) / "curves.png")]
    if any(key.startswith("norm/") for row in rows for key in row):
        written.append(plot_norm_modes(rows, Path(output_dir) / "norm_modes.png"))
    return written
