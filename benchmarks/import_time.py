"""How much ``import adanorm`` costs on top of ``import torch`` (issue #15: at most 1.5x).

    python -m benchmarks.import_time               # 15 repeats of each
    python -m benchmarks.import_time --repeats 31  # more repeats: a steadier median on a busy machine

Each repeat starts a fresh Python process per statement and times the import inside it
(``time.perf_counter`` around the statement, so interpreter start-up is excluded). The two statements
alternate (torch, adanorm, torch, adanorm, ...), so drifting machine load hits both alike; the medians
and their ratio are printed, along with the heavy modules ``import adanorm`` must not load.
A benchmark, not a test: the figure depends on the machine and its load.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

STATEMENTS = {"torch": "import torch", "adanorm": "import adanorm"}
HEAVY = ("monai", "lightning", "hydra", "omegaconf", "matplotlib", "nibabel", "scipy", "triton")
TARGET_RATIO = 1.5
_PROBE = (
    "import sys, time\n"
    "start = time.perf_counter()\n"
    "{statement}\n"
    "elapsed = time.perf_counter() - start\n"
    "print(elapsed)\n"
    "print(','.join(m for m in {heavy!r} if m in sys.modules))\n"
)


def time_import(statement: str) -> tuple:
    """Seconds the statement takes in a fresh interpreter, and the heavy modules it left in sys.modules."""
    result = subprocess.run([sys.executable, "-c", _PROBE.format(statement=statement, heavy=HEAVY)],
                            capture_output=True, text=True, check=True)
    seconds, loaded = (result.stdout.splitlines() + [""])[:2]
    return float(seconds), [name for name in loaded.split(",") if name]


def measure(repeats: int) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {name: [] for name in STATEMENTS}
    for statement in STATEMENTS.values():  # one untimed round: page cache, .pyc files
        time_import(statement)
    for _ in range(repeats):
        for name, statement in STATEMENTS.items():
            times[name].append(time_import(statement)[0])
    return times


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="fresh processes per statement (default: 15)")
    args = parser.parse_args(argv)

    _, loaded = time_import(STATEMENTS["adanorm"])
    times = measure(args.repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["adanorm"] / medians["torch"]
    print(f"| import | median of {args.repeats} | min | max |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.3f} s | {min(values):.3f} s | {max(values):.3f} s |")
    print(f"\nimport adanorm / import torch: {ratio:.2f}x (target <= {TARGET_RATIO}x: "
          f"{'met' if ratio <= TARGET_RATIO else 'MISSED'})")
    print(f"heavy modules after import adanorm: {', '.join(loaded) if loaded else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
