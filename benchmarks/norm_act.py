"""One fused norm + activation layer against the unfused adaptive pair and the native pair it replaces: the time of a
training step's forward and backward through the layer alone, where the fusion's cost or gain is not hidden by
convolutions (``benchmarks.memory`` times whole networks).

    python -m benchmarks.norm_act                       # group and batch statistics, both layouts, leaky ReLU, PReLU, ELU
    python -m benchmarks.norm_act --threads 2 --repeats 15
    python -m benchmarks.norm_act --quick               # one shape (seconds)

Each case builds the three variants, then times them in turn, one step each per round, for ``--repeats`` rounds after
a warm-up round, and reports the medians (interleaved, so that load drifting on a shared machine meets every
variant alike). A step is ``layer(x * 1.0)`` (a non-leaf input, as a convolution's output) and ``backward``.
Writes ``benchmarks/results/norm_act.md``. Target (issue #22): fused ≤ 1.00× the unfused adaptive pair.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

import adanorm
from benchmarks.norms import machine_info

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
# (mode, batch, channels, side): group statistics at a 3D network's batch, batch statistics at a video batch.
SHAPES = (("group", 2, 32, 32), ("group", 2, 16, 64), ("batch", 32, 32, 16))
ACTIVATIONS = {"leaky_relu": (nn.LeakyReLU, {"negative_slope": 0.01}), "prelu": (nn.PReLU, {}), "elu": (nn.ELU, {"alpha": 1.0})}


def variants(mode: str, channels: int, activation: str) -> Dict[str, nn.Module]:
    module, kwargs = ACTIVATIONS[activation]
    native_norm = nn.BatchNorm3d(channels) if mode == "batch" else nn.GroupNorm(min(channels, 32) // 4 or 1, channels)
    # The adaptive layer runs `mode` with the group count of the native GroupNorm it stands in for.
    groups = None if mode == "batch" else native_norm.num_groups
    adaptive = {"mode": mode, "num_groups": groups}
    return {
        "native": nn.Sequential(native_norm, module(**kwargs)),
        "adaptive": nn.Sequential(adanorm.AdaptiveNorm3d(channels, **adaptive), module(**kwargs)),
        "fused": adanorm.AdaptiveNormAct3d(channels, activation=activation, **adaptive, **kwargs),
    }


def step_times(models: Dict[str, nn.Module], x: torch.Tensor, repeats: int) -> Dict[str, float]:
    times: Dict[str, List[float]] = {name: [] for name in models}
    for _ in range(repeats + 1):  # the first round warms up
        for name, model in models.items():
            start = time.perf_counter()
            model(x * 1.0).backward(torch.ones_like(x))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed rounds (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the first shape only (2×32×32³, group statistics)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [f"One layer, forward + backward, median of {args.repeats} interleaved rounds; {machine_info()}.", "",
             "| mode | input | layout | activation | native | adaptive | fused | fused / adaptive | fused / native |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for mode, batch, channels, side in SHAPES[:1] if args.quick else SHAPES:
        for layout, memory_format in LAYOUTS.items():
            x = torch.randn(batch, channels, side, side, side).contiguous(memory_format=memory_format).requires_grad_()
            for activation in ACTIVATIONS:
                seconds = step_times(variants(mode, channels, activation), x, args.repeats)
                verdicts.append(seconds["fused"] <= seconds["adaptive"])
                lines.append(f"| {mode} | {batch}×{channels}×{side}³ | {layout} | {activation} | "
                             + " | ".join(f"{seconds[v] * 1e3:.1f} ms" for v in ("native", "adaptive", "fused"))
                             + f" | {seconds['fused'] / seconds['adaptive']:.2f} | {seconds['fused'] / seconds['native']:.2f} |")
    lines += ["", f"Target fused ≤ 1.00× adaptive: {sum(verdicts)}/{len(verdicts)} cases."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "norm_act.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
