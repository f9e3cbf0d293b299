"""Summarises the study's runs (``study/run.py``): a CSV, a Markdown report and a plot.

    python -m study.report                      # study/results/runs.csv -> study.csv, study.md, study.png
    python -m study.report --data mni152        # one data set only (default: every data set in the runs)

``--runs`` takes one or more CSVs, each optionally as ``PATH=LABEL``: the plain ``adaptive`` rows of that file are
then shown as LABEL. That keeps runs of the adaptive layer under different default policies apart: by default
``runs.csv`` (the grids, run under the old default ``Policy(min_batch_size=8)``, MODES order),
``runs-new-default.csv`` (the rerun of the adaptive cells under the default of commit 4ffbdfc: batch -> group ->
instance, batch mode from 32 samples; and the MNI152 additions) and ``video.csv`` (the video grid, run under that
default).

For every (data, protocol, batch, norm): the mean and sd over seeds of the final validation score (eval mode;
Dice for segmentation, accuracy for the video task: the ``metric`` column), the best-epoch score, the
train-mode score and the train/eval gap (train mode minus eval mode), and the tile
mismatch of each ``--norm-stats`` choice where measured. The comparison the study answers, "at my batch size,
is adaptive at least as good as the best fixed norm?", is made per seed (the same seed means the same data
and crops): adaptive minus the fixed norm (batch, instance, group) with the best mean at that batch size,
against the seed noise (the sd over seeds, pooled over the norms at that batch size).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from study.run import RENAMED

RESULTS = Path(__file__).resolve().parent / "results"
FIXED = ("batch", "instance", "group")
OLD_DEFAULT = "adaptive (old default, min_batch_size 8)"
NEW_DEFAULT = "adaptive (new default)"
ADAPTIVE = ("adaptive", OLD_DEFAULT, NEW_DEFAULT, "adaptive+renorm", "adaptive:group_first", "adaptive:groups4")
DEFAULT_RUNS = [f"{RESULTS / 'runs.csv'}={OLD_DEFAULT}", f"{RESULTS / 'runs-new-default.csv'}={NEW_DEFAULT}",
                f"{RESULTS / 'video.csv'}={NEW_DEFAULT}"]
NORM_ORDER = FIXED + ADAPTIVE


def ordered_norms(names) -> List[str]:
    """The norms of ``names`` in table order: the fixed ones, the adaptive variants above, then any other
    adaptive variant (``adaptive:min_batch_size=N``) by name."""
    present = set(names)
    return [norm for norm in NORM_ORDER if norm in present] + sorted(present - set(NORM_ORDER))


def is_adaptive(norm: str) -> bool:
    return norm.startswith("adaptive")
TILE_MODES = ("tile", "running", "volume")
METRICS = ("val_score", "val_score_best", "train_mode_score", "train_eval_gap",
           *[f"tile_mismatch_{mode}" for mode in TILE_MODES], "fit_s", "total_s")


def read_runs(specs: Sequence[str]) -> pd.DataFrame:
    """Reads each ``PATH`` or ``PATH=LABEL`` (plain ``adaptive`` rows relabelled LABEL); missing files are skipped
    unless none is there."""
    frames = []
    for spec in specs:
        path, _, label = str(spec).partition("=")
        if not Path(path).is_file():
            continue
        frame = pd.read_csv(path).rename(columns=RENAMED)  # an older runner's Dice columns
        if "metric" not in frame:
            frame["metric"] = "dice"
        if label:
            frame.loc[frame["norm"] == "adaptive", "norm"] = label
        frames.append(frame)
    if not frames:
        raise SystemExit(f"none of {list(specs)} is there")
    return pd.concat(frames, ignore_index=True)


def load_runs(path, data: Optional[str], protocol: Optional[str]) -> pd.DataFrame:
    runs = read_runs(path if isinstance(path, (list, tuple)) else [path])
    runs = runs[runs["status"] == "ok"]
    if data:
        runs = runs[runs["data"] == data]
    if protocol:
        runs = runs[runs["protocol"] == protocol]
    for column in METRICS:
        runs[column] = pd.to_numeric(runs.get(column), errors="coerce")
    return runs


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (data, protocol, batch, norm): n seeds, and mean/sd of each metric."""
    rows = []
    for (data, protocol, batch, norm), group in runs.groupby(["data", "protocol", "batch", "norm"]):
        row: Dict[str, object] = {"data": data, "protocol": protocol, "batch": int(batch), "norm": norm, "seeds": len(group),
                                  "metric": group["metric"].iloc[0]}
        for column in METRICS:
            values = group[column].dropna()
            row[f"{column}_mean"] = round(values.mean(), 5) if len(values) else None
            row[f"{column}_sd"] = round(values.std(ddof=1), 5) if len(values) > 1 else None
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["norm_rank"] = table["norm"].map({norm: index for index, norm in enumerate(ordered_norms(table["norm"]))})
    return table.sort_values(["data", "protocol", "batch", "norm_rank"]).drop(columns="norm_rank")


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (data, protocol, batch): adaptive (and adaptive+renorm) minus the best fixed norm, paired by seed."""
    rows = []
    for (data, protocol, batch), group in runs.groupby(["data", "protocol", "batch"]):
        by_norm = group.pivot_table(index="seed", columns="norm", values="val_score")
        fixed = [norm for norm in FIXED if norm in by_norm]
        if not fixed:
            continue
        best = max(fixed, key=lambda norm: by_norm[norm].mean())
        variances = [by_norm[norm].dropna().var(ddof=1) for norm in by_norm if by_norm[norm].count() > 1]
        noise = math.sqrt(sum(variances) / len(variances)) if variances else float("nan")
        for candidate in ordered_norms(norm for norm in by_norm if is_adaptive(norm)):
            difference = paired(by_norm, candidate, best)
            if not difference["n"]:
                continue
            mean = difference["mean"]
            verdict = ("behind" if mean < -noise else "ahead" if mean > noise else "within noise") if noise == noise else "n/a"
            rows.append({"data": data, "protocol": protocol, "batch": int(batch), "candidate": candidate,
                         "best_fixed": best, "best_fixed_score": by_norm[best].mean(),
                         "candidate_score": by_norm[candidate].mean(), "diff_mean": mean, "diff_sd": difference["sd"],
                         "diff_ci95": difference["ci"], "seeds": difference["n"], "seed_noise": noise, "verdict": verdict})
    return pd.DataFrame(rows)


def crossing(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (data, protocol, batch): batch norm minus each per-sample norm (instance, group), paired by seed:
    where batch statistics start to pay, i.e. where Policy.min_batch_size should sit."""
    rows = []
    for (data, protocol, batch), group in runs.groupby(["data", "protocol", "batch"]):
        by_norm = group.pivot_table(index="seed", columns="norm", values="val_score")
        if "batch" not in by_norm:
            continue
        for other in ("instance", "group"):
            if other in by_norm:
                difference = paired(by_norm, "batch", other)
                rows.append({"data": data, "protocol": protocol, "batch": int(batch), "versus": other,
                             "diff_mean": difference["mean"], "diff_sd": difference["sd"], "diff_ci95": difference["ci"],
                             "seeds": difference["n"]})
    return pd.DataFrame(rows)


def paired(by_norm: pd.DataFrame, first: str, second: str) -> Dict[str, float]:
    """Mean, sd and 95% t-interval half-width of ``first − second``, paired by seed."""
    from scipy.stats import t

    difference = (by_norm[first] - by_norm[second]).dropna()
    n = len(difference)
    sd = difference.std(ddof=1) if n > 1 else float("nan")
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": difference.mean() if n else float("nan"), "sd": sd, "ci": half, "n": n}


def pm(mean: Optional[float], sd: Optional[float], digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def grid_table(summary: pd.DataFrame, metric: str, digits: int = 3) -> List[str]:
    norms = ordered_norms(summary["norm"])
    lines = ["| batch | " + " | ".join(norms) + " |", "|---:|" + "---:|" * len(norms)]
    for batch, group in summary.groupby("batch"):
        cells = []
        for norm in norms:
            row = group[group["norm"] == norm]
            if row.empty:
                cells.append("–")
                continue
            row = row.iloc[0]
            mean, sd = row[f"{metric}_mean"], row[f"{metric}_sd"]
            cells.append(pm(None if pd.isna(mean) else float(mean), None if pd.isna(sd) else float(sd), digits))
        best = max((norm for norm in FIXED if norm in norms), default=None,
                   key=lambda norm: float(group[group["norm"] == norm][f"{metric}_mean"].fillna(-1).max()))
        if metric == "val_score" and best is not None:
            index = norms.index(best)
            cells[index] = f"**{cells[index]}**"
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: pd.DataFrame, comparison: pd.DataFrame, crossing_table: pd.DataFrame, runs: pd.DataFrame) -> str:
    out: List[str] = []
    for (data, protocol), part in summary.groupby(["data", "protocol"]):
        seeds = sorted(runs[(runs["data"] == data) & (runs["protocol"] == protocol)]["seed"].unique())
        out += [f"## {data} (protocol {protocol}, seeds {', '.join(map(str, seeds))})", ""]
        score = score_name(runs[(runs["data"] == data) & (runs["protocol"] == protocol)])
        what = "foreground classes" if score == "Dice" else "share of clips classified right"
        out += [f"Validation {score} (final epoch, eval mode, {what}), mean ± sd over seeds; bold: best fixed norm.", ""]
        out += grid_table(part, "val_score") + [""]
        out += [f"Best-epoch validation {score} (what the recipe's checkpoint keeps), mean ± sd:", ""]
        out += grid_table(part, "val_score_best") + [""]
        out += [f"Train/eval gap: {score} with the model in train mode (batch statistics over `batch` windows or clips at "
                "a time) minus eval mode, mean ± sd:", ""]
        out += grid_table(part, "train_eval_gap") + [""]
        tile_columns = [mode for mode in TILE_MODES if part[f"tile_mismatch_{mode}_mean"].notna().any()]
        if tile_columns:
            for mode in tile_columns:
                out += [f"Tile mismatch with `--norm-stats {mode}`, mean ± sd:", ""]
                out += grid_table(part, f"tile_mismatch_{mode}", digits=4) + [""]
        elif score == "Dice":
            out += ["Tile mismatch: not measured (`adanorm.tiling` was not available when these runs ran).", ""]
        cmp = comparison[(comparison["data"] == data) & (comparison["protocol"] == protocol)]
        if not cmp.empty:
            out += [f"Adaptive vs the best fixed norm at each batch size, paired by seed (difference of validation {score}, "
                    "mean ± sd and 95% t-interval; seed noise = sd over seeds pooled over the norms at that batch size; "
                    "'behind' = the mean difference is below minus the seed noise):", "",
                    f"| batch | candidate | best fixed | best fixed {score} | candidate {score} | "
                    "difference (mean ± sd) | 95% CI | seed noise | verdict |",
                    "|---:|---|---|---:|---:|---:|---:|---:|---|"]
            for row in cmp.itertuples():
                out.append(f"| {row.batch} | {row.candidate} | {row.best_fixed} | {row.best_fixed_score:.3f} | "
                           f"{row.candidate_score:.3f} | {pm(row.diff_mean, row.diff_sd, 3)} | "
                           f"[{row.diff_mean - row.diff_ci95:+.3f}, {row.diff_mean + row.diff_ci95:+.3f}] | "
                           f"{row.seed_noise:.3f} | {row.verdict} |")
            out.append("")
        cross = crossing_table[(crossing_table["data"] == data) & (crossing_table["protocol"] == protocol)]
        if not cross.empty:
            out += ["Where batch statistics start to pay (the crossing point `Policy.min_batch_size` stands for): batch norm "
                    "minus each per-sample norm, paired by seed, mean ± sd [95% CI]:", "",
                    "| batch | batch − instance | batch − group |", "|---:|---:|---:|"]
            for batch, part_ in cross.groupby("batch"):
                cells = []
                for other in ("instance", "group"):
                    row = part_[part_["versus"] == other]
                    if row.empty:
                        cells.append("–")
                        continue
                    row = row.iloc[0]
                    cells.append(f"{pm(row.diff_mean, row.diff_sd, 3)} [{row.diff_mean - row.diff_ci95:+.3f}, "
                                 f"{row.diff_mean + row.diff_ci95:+.3f}]")
                out.append(f"| {batch} | " + " | ".join(cells) + " |")
            out.append("")
        seconds = runs[(runs["data"] == data) & (runs["protocol"] == protocol)]["total_s"]
        out += [f"{len(seconds)} runs, {seconds.sum() / 60:.1f} min of cell time in all "
                f"(median {seconds.median():.1f} s per run).", ""]
    return "\n".join(out)


def score_name(runs: pd.DataFrame) -> str:
    """Dice or accuracy: one data set's score (its rows share the recipe's task)."""
    return "accuracy" if set(runs["metric"]) == {"accuracy"} else "Dice"


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary.groupby(["data", "protocol"]))
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.2 * len(groups)), squeeze=False)
    for (key, part), (score_axis, gap_axis) in zip(groups, axes):
        score = score_name(part)
        for norm in ordered_norms(part["norm"]):
            rows = part[part["norm"] == norm].sort_values("batch")
            style = {"linestyle": "-" if is_adaptive(norm) else "--", "marker": "o", "capsize": 3}
            score_axis.errorbar(rows["batch"], rows["val_score_mean"], yerr=rows["val_score_sd"].fillna(0), label=norm, **style)
            gap_axis.errorbar(rows["batch"], rows["train_eval_gap_mean"], yerr=rows["train_eval_gap_sd"].fillna(0),
                              label=norm, **style)
        for axis, label in ((score_axis, f"validation {score} (eval mode)"), (gap_axis, f"train-mode minus eval-mode {score}")):
            axis.set_xscale("log", base=2)
            batches = sorted(part["batch"].unique())
            axis.set_xticks(batches, [str(batch) for batch in batches])
            axis.set_xlabel("batch size")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            axis.axvline(8, color="grey", linewidth=0.8, linestyle=":")  # the old default's min_batch_size (8)
        gap_axis.axhline(0, color="black", linewidth=0.6)
        score_axis.set_title(f"{key[0]} ({key[1]}): mean ± sd over seeds")
        gap_axis.set_title("train/eval gap")
        score_axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                        help="the runner's CSVs, each PATH or PATH=LABEL (plain adaptive rows shown as LABEL; default: %(default)s)")
    parser.add_argument("--data", default=None, help="one data set (default: all in the runs)")
    parser.add_argument("--protocol", default=None, help="one protocol tag (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for study.csv, study.md, study.png")
    parser.add_argument("--name", default="study", help="file name stem (default: %(default)s)")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs, args.data, args.protocol)
    if runs.empty:
        raise SystemExit(f"no finished runs in {args.runs}" + (f" for data={args.data}" if args.data else ""))
    summary = summarise(runs)
    comparison = compare(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(args.out / f"{args.name}.csv", index=False)
    text = markdown(summary, comparison, crossing(runs), runs)
    (args.out / f"{args.name}.md").write_text(text)
    plot(summary, args.out / f"{args.name}.png")
    print(text)
    print(f"wrote {args.out / (args.name + '.csv')}, {args.out / (args.name + '.md')}, {args.out / (args.name + '.png')}")


if __name__ == "__main__":
    main()
