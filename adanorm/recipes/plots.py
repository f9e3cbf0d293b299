"""The run's PNGs, drawn from the CSV log so that a plot shows exactly what was logged."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from adanorm.integrations.lightning import (  # noqa: E402
    DEFAULT_PREFIX,
    EVAL,
    FALLBACK_FRACTION,
    STAGES,
    TRAIN,
    NormMetric,
)
from adanorm.policy import MODES  # noqa: E402

MODE_COLORS = {"batch": "#1f77b4", "instance": "#ff7f0e", "group": "#2ca02c", "layer": "#d62728", "identity": "#7f7f7f"}


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


FELL_BACK = "fell back (spatial size too small)"
"""The legend entry of the hatched share: forwards whose spatial size forced a later mode than the one their
batch size chose (``adanorm.policy.is_fallback``)."""


class StageModes(NamedTuple):
    """Per layer (input to output), the share of a stage's forwards that ran each mode, and the share that fell
    back (``NormModeMonitor``'s ``fallback_fraction``)."""

    modes: Dict[str, Dict[str, float]]
    fell_back: Dict[str, float]


def stage_modes(rows: List[Dict[str, float]], stage: str, prefix: str = DEFAULT_PREFIX) -> StageModes:
    """Sums NormModeMonitor's per-epoch counts over the run (each epoch's fallback share weighted by its forwards)."""
    counts: Dict[str, Dict[str, float]] = defaultdict(lambda: dict.fromkeys(MODES, 0.0))
    fell_back: Dict[str, float] = defaultdict(float)
    for row in rows:
        parsed = [(metric, value) for key, value in row.items()
                  if (metric := NormMetric.parse(key, prefix)) is not None and metric.stage == stage and metric.layer]
        forwards: Dict[str, float] = defaultdict(float)
        for metric, value in parsed:
            if metric.name in MODES:
                counts[metric.layer][metric.name] += value
                forwards[metric.layer] += value
        for metric, value in parsed:  # a row holds an epoch's counts and fractions together
            if metric.name == FALLBACK_FRACTION:
                fell_back[metric.layer] += value * forwards[metric.layer]
    totals = {layer: sum(c.values()) for layer, c in counts.items()}
    return StageModes({layer: {mode: n / max(totals[layer], 1.0) for mode, n in c.items()} for layer, c in counts.items()},
                      {layer: fell_back[layer] / max(totals[layer], 1.0) for layer in counts})


def _summary(fractions: Dict[str, Dict[str, float]]) -> str:
    """Either 'group in every layer' or each mode's share of the forwards."""
    used = {mode for shares in fractions.values() for mode, share in shares.items() if share > 0}
    if len(used) == 1:
        return f"{used.pop()} in every layer"
    overall = {mode: sum(shares[mode] for shares in fractions.values()) / max(len(fractions), 1) for mode in MODES}
    return ", ".join(f"{mode} {share:.0%}" for mode, share in overall.items() if share > 0) or "no forwards"


def _fallback_note(stage: StageModes) -> str:
    layers = [layer for layer, share in stage.fell_back.items() if share > 0]
    if not layers:
        return "no fallbacks"
    overall = sum(stage.fell_back.values()) / max(len(stage.fell_back), 1)
    return (f"{len(layers)} of {len(stage.fell_back)} layers fell back: spatial size too small "
            f"({overall:.0%} of forwards, hatched)")


def norm_modes_figure(rows: List[Dict[str, float]], prefix: str = DEFAULT_PREFIX) -> Figure:
    """One bar per adaptive layer (input to output), split by the share of forwards in each mode.

    The bars show the designed path as plain colours, per-sample statistics below ``min_batch_size`` samples
    included; only a fallback, a forward whose spatial size left too few values for the mode its batch size
    chose (a 1×1×1 bottleneck), is hatched, since that is where the user may want a larger patch.
    """
    stages = {stage: stage_modes(rows, stage, prefix) for stage in STAGES}
    layers = list(stages[TRAIN].modes or stages[EVAL].modes)
    names = [layer.removeprefix("net.") for layer in layers]
    figure, axes = plt.subplots(1, 2, figsize=(12, 2.2 + 0.3 * len(layers)), sharey=True, layout="constrained")
    for axis, stage in zip(axes, STAGES):
        modes = stages[stage].modes
        left = [0.0] * len(layers)
        for mode in MODES:
            widths = [modes.get(layer, {}).get(mode, 0.0) for layer in layers]
            axis.barh(range(len(layers)), widths, left=left, color=MODE_COLORS[mode], label=mode)
            # Eval batch mode normalizes with the running statistics learned in training.
            text = "batch (running statistics)" if stage == EVAL and mode == "batch" else mode
            for y, (start, width) in enumerate(zip(left, widths)):
                if width >= 0.012 * len(text):
                    axis.text(start + width / 2, y, text, ha="center", va="center", color="white", fontsize=7, zorder=3,
                              bbox={"facecolor": MODE_COLORS[mode], "edgecolor": "none", "pad": 1.5})
            left = [a + b for a, b in zip(left, widths)]
        fell_back = [stages[stage].fell_back.get(layer, 0.0) for layer in layers]
        if any(fell_back):
            axis.barh(range(len(layers)), fell_back, left=[1.0 - share for share in fell_back], fill=False, hatch="///",
                      edgecolor="0.15", linewidth=0, label=FELL_BACK)
        name = "training" if stage == TRAIN else "eval"
        axis.set_title(f"{name} forwards: {_summary(modes)}", fontsize=10)
        axis.set(xlim=(0, 1))
        axis.set_xlabel(f"fraction of forwards\n{_fallback_note(stages[stage])}", fontsize=8)
    axes[0].set_yticks(range(len(layers)), names, fontsize=7)
    axes[0].invert_yaxis()
    legend = {label: handle for axis in axes for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=len(MODES) + 1, fontsize=8,
                  frameon=False)
    figure.suptitle("adanorm: the mode each layer ran (input at the top)")
    return figure


def plot_norm_modes(rows: List[Dict[str, float]], path: Path, prefix: str = DEFAULT_PREFIX) -> Path:
    """Saves :func:`norm_modes_figure` as ``path``."""
    figure = norm_modes_figure(rows, prefix)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_run_plots(metrics_csv: Path, output_dir: Path, monitor: str) -> List[Path]:
    """``curves.png`` always; ``norm_modes.png`` when the model has adaptive layers."""
    rows = read_metrics(metrics_csv)
    written = [plot_curves(rows, monitor, Path(output_dir) / "curves.png")]
    if any(NormMetric.parse(key) is not None for row in rows for key in row):
        written.append(plot_norm_modes(rows, Path(output_dir) / "norm_modes.png"))
    return written
