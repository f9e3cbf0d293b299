"""The benchmark scripts run end to end, as users run them (``python -m``, in their own process, since they
change the process's allocator settings), and write what BENCHMARKS.md promises (one-repeat smoke runs)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case runs a benchmark script in its own process

REPOSITORY = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quick_benchmark_writes_tables_and_chart(tmp_path):
    out = _run("benchmarks.norms", "--quick", "--repeats", "1", "--modes", "instance", "--skip", "memory,tiny,unet",
               "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "norms.csv").open()))
    assert {row["mode"] for row in rows} == {"instance"}
    assert {row["layout"] for row in rows} == {"contiguous", "channels_last_3d"}
    summary = (tmp_path / "summary.md").read_text()
    assert "target 2" in summary and "## Target 1" in summary
    assert "glibc heap only" in summary or "default allocator" in summary  # the report says how it allocated
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "target 1" in out


def test_threshold_benchmark_compares_both_kernels_and_restores_the_thresholds(tmp_path):
    out = _run("benchmarks.thresholds", "--modes", "layer", "--shapes", "quick", "--repeats", "1", "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "thresholds.csv").open()))
    assert len(rows) == 3 * 2 * 2 * 2  # shapes x dtypes x layouts x passes
    assert all(float(row["compiled_us"]) > 0 and float(row["native_us"]) > 0 for row in rows)
    assert "compiled / native" in out


def test_threshold_benchmark_leaves_the_dispatch_thresholds_as_they_were():
    from adanorm.functional import dispatch
    from benchmarks import thresholds

    before = {name: getattr(dispatch, name) for name in thresholds.THRESHOLDS}
    thresholds.measure(["layer"], [(1, 8, 4, 4, 4)], repeats=1)
    assert {name: getattr(dispatch, name) for name in thresholds.THRESHOLDS} == before
