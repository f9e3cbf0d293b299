"""Where the compiled CPU kernels beat the native ones: the data behind ``dispatch``'s size thresholds.

    python -m benchmarks.thresholds                  # group and layer mode over the grid, ~10 min here
    python -m benchmarks.thresholds --modes instance --shapes quick

For every cell of the grid (mode, shape, dtype, layout) the same adanorm layer is timed twice per
pass, once with every ``MIN_NUMEL_*`` threshold at 0 (the compiled kernels forced) and once with
every threshold out of reach (the native kernels forced), interleaved as in ``benchmarks.norms``, so
the ratio compares kernels with the layer's own fixed cost on both sides. Below 1: the compiled
kernel is faster. Writes ``thresholds.csv`` and prints one line per cell, sorted by size, which is
how the thresholds are read off: the smallest size from which the ratios stay below 1.
"""
from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Callable, Dict

import torch

from adanorm.functional import dispatch
from benchmarks.norms import (
    DTYPES,
    FULL_SHAPES,
    LAYOUTS,
    QUICK_SHAPES,
    _forward,
    _forward_backward,
    _randomize_affine,
    adanorm_module,
    steady_allocator,
    time_interleaved,
)

THRESHOLDS = [name for name in dir(dispatch) if name.startswith("MIN_NUMEL_")]
OUT_OF_REACH = 1 << 62


def _with_kernels(compiled: bool, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with the dispatch thresholds set so that the compiled (or the native) kernels run."""
    def run() -> None:
        for name in THRESHOLDS:
            setattr(dispatch, name, 0 if compiled else OUT_OF_REACH)
        fn()
    return run


def measure(modes, shapes, repeats: int):
    import pandas as pd
    from tqdm import tqdm

    saved = {name: getattr(dispatch, name) for name in THRESHOLDS}
    cells = [(mode, shape, dtype_name, layout_name) for mode in modes for shape in shapes for dtype_name in DTYPES
             for layout_name in LAYOUTS]
    rows = []
    try:
        for mode, shape, dtype_name, layout_name in tqdm(cells, desc="compiled vs native", unit="cell", dynamic_ncols=True):
            layer = adanorm_module(mode, shape[1])
            _randomize_affine(layer)
            layer.to(DTYPES[dtype_name]).train()
            x = torch.randn(shape, dtype=DTYPES[dtype_name]).contiguous(memory_format=LAYOUTS[layout_name])
            x_grad, dy = x.detach().requires_grad_(True), torch.randn_like(x)
            fns: Dict[tuple, Callable[[], None]] = {}
            for compiled in (True, False):
                fns[("forward", compiled)] = _with_kernels(compiled, _forward(layer, x))
                fns[("forward+backward", compiled)] = _with_kernels(compiled, _forward_backward(layer, x_grad, dy))
            medians = time_interleaved(fns, repeats, min_sample_s=0.002)
            for pass_name in ("forward", "forward+backward"):
                rows.append(dict(mode=mode, shape="x".join(map(str, shape)), numel=math.prod(shape), dtype=dtype_name,
                                 layout=layout_name, pass_=pass_name, compiled_us=medians[(pass_name, True)] * 1e6,
                                 native_us=medians[(pass_name, False)] * 1e6,
                                 ratio=medians[(pass_name, True)] / medians[(pass_name, False)]))
    finally:
        for name, value in saved.items():
            setattr(dispatch, name, value)
    return pd.DataFrame(rows).rename(columns={"pass_": "pass"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="group,layer", help="comma-separated modes (default: group,layer)")
    parser.add_argument("--shapes", choices=("full", "quick"), default="full")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if dispatch.cpu_kernels() is None:
        raise SystemExit("adanorm's compiled CPU kernels are not available here (see the warning above): nothing to compare.")
    allocator = steady_allocator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = measure(args.modes.split(","), FULL_SHAPES if args.shapes == "full" else QUICK_SHAPES, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "thresholds.csv", index=False)
    wide = table.pivot_table(index=["mode", "layout", "dtype", "numel", "shape"], columns="pass", values="ratio")
    print(f"compiled / native per cell ({torch.get_num_threads()} threads, {allocator}; below 1: compiled faster)")
    print(wide.round(2).to_string())
    print(f"\nwrote {args.out / 'thresholds.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
