"""Activation memory of one training step: native norms, adaptive norms, and adaptive norms fused with their
activation (``convert(fuse_activation=True)``), on four 3D segmentation networks in both memory layouts.

    python -m benchmarks.memory --size 96 --repeats 0   # issue #22's size, memory only (about an hour on 2 cores)
    python -m benchmarks.memory                 # batch 2, 64³ patches, both layouts
    python -m benchmarks.memory --quick         # 32³, contiguous only (a few minutes)
    python -m benchmarks.memory --budget-gib 8  # the largest cubic patch whose saved activations fit 8 GiB
    python -m benchmarks.memory --time-only --time-size 48 --networks DynUNet,UNet   # step times alone

Two measures per network, variant and layout, each case in a fresh process:

* saved for backward: the bytes of every distinct storage that autograd keeps during one train-mode forward
  (``torch.autograd.graph.saved_tensors_hooks``), which is what sets the patch size a GPU can train;
* peak process memory of one forward+backward above the resident size before it (``VmHWM``, reset through
  ``/proc/self/clear_refs``; large blocks go back to the system on free), which also counts temporaries.

Step time: the three variants of a network built in one process and trained in turn, one step each per round in
an order that rotates, ``--repeats`` rounds after a warm-up round, at ``--time-size``³; the median step of each,
and the median of the per-round ratios fused / adaptive (steps seconds apart, so that load drifting on a shared
machine cancels) with their quartiles; and the CPU time per step outside the convolutions (profiler), the part
fusion changes, which the step's own variation would hide.

The largest patch: saved bytes are linear in the patch's voxels at a fixed network depth (every saved tensor is
a feature map), so two sizes give the line, solved for the budget and rounded down to the network's
downsampling factor.

Targets (issue #22): on DynUNet and PlainConvUNet (``TARGETED``) fused saves at most 0.65× native's bytes and peaks
at most 0.75× native's step, in both layouts, and its largest patch under the budget has at least 1.15× native's
edge; on the others it saves less than native, peaks no higher and fits a larger patch. The fused step is not
measurably slower than the unfused adaptive one (the lower quartile of their per-round ratios at most 1), and its
time outside the convolutions is at most the unfused one's (both layouts).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import adanorm
from benchmarks.norms import _status_kib, machine_info

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
VARIANTS = ("native", "adaptive", "fused")
MIB = 1 << 20


def dynunet() -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(3, 1, 2, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2] * 4,
                   norm_name="instance", act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}))


def monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="instance")


def _nnunet(name: str) -> nn.Module:
    from dynamic_network_architectures.architectures import unet

    stages, features = 5, (32, 64, 128, 256, 320)
    kwargs = dict(input_channels=1, n_stages=stages, features_per_stage=features, conv_op=nn.Conv3d, kernel_sizes=3,
                  strides=(1, 2, 2, 2, 2), num_classes=2, n_conv_per_stage_decoder=(2,) * (stages - 1), conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True})
    if name == "PlainConvUNet":
        return unet.PlainConvUNet(n_conv_per_stage=(2,) * stages, **kwargs)
    return unet.ResidualEncoderUNet(n_blocks_per_stage=(1, 3, 4, 6, 6), **kwargs)


NETWORKS: Dict[str, Tuple[Callable[[], nn.Module], int]] = {
    "MONAI DynUNet (LeakyReLU)": (dynunet, 16),
    "MONAI UNet (PReLU)": (monai_unet, 16),
    "nnU-Net PlainConvUNet (LeakyReLU)": (lambda: _nnunet("PlainConvUNet"), 16),
    "nnU-Net ResidualEncoderUNet (LeakyReLU)": (lambda: _nnunet("ResidualEncoderUNet"), 16),
}


TARGETED = ("MONAI DynUNet (LeakyReLU)", "nnU-Net PlainConvUNet (LeakyReLU)")
"""The networks issue #22 sets memory figures for: saved ≤ 0.65× and peak ≤ 0.75× native's (at 96³, where the
convolutions' weights no longer dominate the saved bytes)."""


def build(network: str, variant: str, layout: str) -> nn.Module:
    torch.manual_seed(0)
    model = NETWORKS[network][0]()
    if variant != "native":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ReLU pairs left unfused: none in these networks
            model = adanorm.convert(model, fuse_activation=variant == "fused")
    return model.to(memory_format=LAYOUTS[layout]).train()


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward of ``model``."""
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output = model(x)
    del output
    return sum(storages.values())


def peak_step_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Process high-water mark above the resident size before one forward+backward."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x).float().mean().backward()
    return (_status_kib("VmHWM") - base) * 1024


def step_seconds(network: str, layout: str, size: int, repeats: int) -> Dict[str, object]:
    """Median seconds of one forward+backward of each variant, and the median and quartiles of the per-round
    ratio fused / adaptive. The variants run one step each per round, in an order that rotates round by round, so
    that neither load drifting on a shared machine nor the allocator state one variant leaves to the next favours
    a variant; the ratio of two steps taken seconds apart cancels the drift that the medians of whole columns keep."""
    models = {variant: build(network, variant, layout) for variant in VARIANTS}
    x = torch.randn(2, 1, *(3 * [size])).contiguous(memory_format=LAYOUTS[layout])
    times: Dict[str, List[float]] = {variant: [] for variant in VARIANTS}
    order = list(VARIANTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats + 1):  # the first round warms up (once-only allocations, kernel choices)
            for variant in order:
                model = models[variant]
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                model(x).float().mean().backward()
                times[variant].append(time.perf_counter() - start)
            order = order[1:] + order[:1]
    ratios = [fused / adaptive for fused, adaptive in zip(times["fused"][1:], times["adaptive"][1:])]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {**{variant: statistics.median(values[1:]) for variant, values in times.items()},
            "ratio": statistics.median(ratios), "ratio_quartiles": [quartiles[0], quartiles[2]],
            "outside_convolutions": outside_convolutions(models, x, rounds=max(repeats // 2, 1))}


def outside_convolutions(models: Dict[str, nn.Module], x: torch.Tensor, rounds: int) -> Dict[str, float]:
    """Median CPU seconds per step of every operator but the convolutions (their self time in the profiler), for the
    adaptive and the fused network, profiled one step each per round: the part of a step that fusing changes.
    Convolutions take most of a step (63–96% in BENCHMARKS.md's networks), so the step's own time varies by about
    as much between rounds as fusion changes it; this measure does not carry their variation."""
    from torch.profiler import ProfilerActivity, profile

    seconds: Dict[str, List[float]] = {"adaptive": [], "fused": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            for variant in seconds:
                models[variant].zero_grad(set_to_none=True)
                with profile(activities=[ProfilerActivity.CPU]) as profiler:
                    models[variant](x).float().mean().backward()
                seconds[variant].append(sum(event.self_cpu_time_total for event in profiler.key_averages()
                                            if "convolution" not in event.key) / 1e6)
    return {variant: statistics.median(values) for variant, values in seconds.items()}


def measure(case: dict) -> dict:
    if case.get("repeats"):
        return dict(case, seconds=step_seconds(case["network"], case["layout"], case["size"], case["repeats"]))
    model = build(case["network"], case["variant"], case["layout"])
    x = torch.randn(2, 1, *(3 * [case["size"]])).contiguous(memory_format=LAYOUTS[case["layout"]])
    result = dict(case, saved=saved_bytes(model, x))
    if case["peak"]:
        peak_step_bytes(model, x)  # warm-up: the first step allocates once-only state
        model.zero_grad(set_to_none=True)
        result["peak"] = peak_step_bytes(model, x)
    del model, x
    gc.collect()
    return result


def run_network(cases: List[dict]) -> List[dict]:
    """One network's cases in child processes: memory cases with an allocator that gives every large block back on
    free, so that one case's memory is not reused by the next one's peak; timed cases with the default allocator,
    as users train (returning blocks to the system on every free would add page faults to every step)."""
    memory_cases = [case for case in cases if not case.get("repeats")]
    timed_cases = [case for case in cases if case.get("repeats")]
    returning = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    return [result for batch, env in ((memory_cases, returning), (timed_cases, dict(os.environ))) if batch
            for result in _run_worker(batch, env)]


def _run_worker(cases: List[dict], env: Dict[str, str]) -> List[dict]:
    process = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--_worker", json.dumps(cases)], env=env,
                             capture_output=True, text=True, cwd=str(Path(__file__).resolve().parent.parent))
    if process.returncode in (-9, 137):  # SIGKILL: the kernel's out-of-memory killer, in practice
        raise RuntimeError(f"{cases[0]['network']}: its worker was killed, most likely out of memory at this patch size")
    if process.returncode != 0:
        raise RuntimeError(f"{cases[0]['network']}: {process.stderr[-2000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def largest_patch(saved_small: int, saved_large: int, small: int, large: int, factor: int, budget: int) -> int:
    """The largest multiple of ``factor`` whose saved bytes, on the line through the two measurements (linear
    in voxels), fit ``budget``."""
    per_voxel = (saved_large - saved_small) / (large ** 3 - small ** 3)
    fixed = saved_small - per_voxel * small ** 3
    side = ((budget - fixed) / per_voxel) ** (1 / 3)
    return int(side // factor) * factor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32³ patches, contiguous only")
    parser.add_argument("--size", type=int, default=None, help="patch side of the step measured (default 64, quick 32)")
    parser.add_argument("--budget-gib", type=float, default=8.0, help="saved-activation budget for the largest patch")
    parser.add_argument("--networks", default="", help="comma-separated parts of network names to run (default: all)")
    parser.add_argument("--layouts", default="", help="comma-separated layouts (default: both; contiguous with --quick)")
    parser.add_argument("--time-size", type=int, default=48, help="patch side of the timed steps (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default %(default)s)")
    parser.add_argument("--time-only", action="store_true", help="step times only (no memory measurement)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output directory")
    parser.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(2)
        print(json.dumps([measure(case) for case in json.loads(args.worker)]))
        return 0
    size = args.size or (32 if args.quick else 64)
    layouts = args.layouts.split(",") if args.layouts else ["contiguous"] if args.quick else list(LAYOUTS)
    networks = [n for n in NETWORKS if not args.networks or any(part in n for part in args.networks.split(","))]
    from tqdm import tqdm

    cases: List[dict] = []
    fit_sizes = (32, 48)  # two bottlenecks above 1×1×1, where native instance norm raises
    if not args.time_only:
        cases += [dict(network=n, variant=v, layout=layout, size=size, peak=True) for n in networks for layout in layouts
                  for v in VARIANTS]
        cases += [dict(network=n, variant=v, layout="contiguous", size=s, peak=False) for n in networks
                  for v in ("native", "fused") for s in fit_sizes]
    if args.repeats > 0:
        cases += [dict(network=n, layout=layout, size=args.time_size, repeats=args.repeats) for n in networks
                  for layout in layouts]
    results: List[dict] = []
    not_measured: Dict[str, str] = {}
    for network in tqdm(networks, desc="networks", unit="network"):
        try:
            results += run_network([case for case in cases if case["network"] == network])
        except RuntimeError as error:  # one network that does not fit the machine must not cost the others' results
            not_measured[network] = str(error)
            print(f"benchmarks.memory: {error}", file=sys.stderr)
    networks = [network for network in networks if network not in not_measured]

    lines = [f"Batch 2, one training step; {machine_info()}.", ""]
    lines += [f"Not measured: {reason}" for reason in not_measured.values()] + ([""] if not_measured else [])
    verdicts: List[bool] = [False] * len(not_measured)
    if not args.time_only:
        lines += memory_tables(results, networks, layouts, size, fit_sizes, args.budget_gib, verdicts)
    timed = [r for r in results if r.get("repeats")]
    if timed:
        lines += [f"Step time at {args.time_size}³ (forward + backward), medians of {args.repeats} rounds in rotating order; "
                  "fused / adaptive is the median of the per-round ratios, with their quartiles; outside convolutions: "
                  "CPU time per step of every other operator (profiler self time, median of interleaved steps):", "",
                  "| network | layout | native | adaptive | fused | fused / adaptive (quartiles) | fused / native "
                  "| outside convolutions: adaptive | fused | fused / adaptive |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in timed:
            seconds = r["seconds"]
            low, high = seconds["ratio_quartiles"]
            outside = seconds["outside_convolutions"]
            # Met where the fused step is not measurably slower (its ratio's lower quartile ≤ 1) and the part of the
            # step that fusion changes is not slower at all.
            verdicts.append(low <= 1.0 and outside["fused"] <= outside["adaptive"])
            lines.append(f"| {r['network']} | {r['layout']} | " + " | ".join(f"{seconds[v]:.2f} s" for v in VARIANTS)
                         + f" | {seconds['ratio']:.3f} ({low:.3f}–{high:.3f}) | {seconds['fused'] / seconds['native']:.2f} "
                         f"| {outside['adaptive'] * 1e3:.1f} ms | {outside['fused'] * 1e3:.1f} ms "
                         f"| {outside['fused'] / outside['adaptive']:.2f} |")
        lines.append("")
    lines += [f"Targets: {'all met' if all(verdicts) else 'NOT all met'} ({sum(verdicts)}/{len(verdicts)})."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "step_time" if args.time_only else "memory"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0 if all(verdicts) else 1


def memory_tables(results: List[dict], networks: List[str], layouts: List[str], size: int, fit_sizes: Tuple[int, int],
                  budget_gib: float, verdicts: List[bool]) -> List[str]:
    """The saved/peak table and the largest-patch table, appending each target's verdict to ``verdicts``."""
    step = {(r["network"], r["layout"], r["variant"]): r for r in results if r.get("peak")}
    lines = [f"Saved for backward and peak memory at {size}³:", "",
             "| network | layout | saved: native | adaptive | fused | fused / native | peak: native | adaptive | fused |",
             "|---|---|---|---|---|---|---|---|---|"]
    for network in networks:
        for layout in layouts:
            row = {v: step[(network, layout, v)] for v in VARIANTS}
            ratio = row["fused"]["saved"] / row["native"]["saved"]
            peak_ratio = row["fused"]["peak"] / row["native"]["peak"]
            if network in TARGETED:
                verdicts += [ratio <= 0.65, peak_ratio <= 0.75]
            else:  # no figure set: fusing must still save, and must not raise the peak
                verdicts += [ratio < 1.0, peak_ratio <= 1.02]
            lines.append(f"| {network} | {layout} | " + " | ".join(f"{row[v]['saved'] / MIB:.0f} MiB" for v in VARIANTS)
                         + f" | {ratio:.2f} | " + " | ".join(f"{row[v]['peak'] / MIB:.0f} MiB" for v in VARIANTS) + " |")
    budget = int(budget_gib * (1 << 30))
    lines += ["", f"Largest cubic patch at batch 2 whose saved activations fit {budget_gib:g} GiB "
              f"(line through {fit_sizes[0]}³ and {fit_sizes[1]}³):", "", "| network | native | fused |", "|---|---|---|"]
    fit = {(r["network"], r["variant"], r["size"]): r["saved"] for r in results if "peak" in r and not r["peak"]}
    for network in networks:
        factor = NETWORKS[network][1]
        patches = {v: largest_patch(fit[(network, v, fit_sizes[0])], fit[(network, v, fit_sizes[1])], *fit_sizes,
                                    factor, budget) for v in ("native", "fused")}
        growth = patches["fused"] / patches["native"]
        verdicts.append(growth >= 1.15 if network in TARGETED else growth > 1.0)
        lines.append(f"| {network} | {patches['native']}³ | {patches['fused']}³ |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
