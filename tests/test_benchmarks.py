"""The benchmark script runs end to end and writes what BENCHMARKS.md promises (a one-repeat, one-mode smoke run)."""
import csv

from benchmarks import norms


def test_quick_benchmark_writes_tables_and_chart(tmp_path, capsys):
    assert norms.main(["--quick", "--repeats", "1", "--modes", "instance", "--skip", "memory,tiny,unet", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "norms.csv").open()))
    assert {row["mode"] for row in rows} == {"instance"}
    assert {row["layout"] for row in rows} == {"contiguous", "channels_last_3d"}
    summary = (tmp_path / "summary.md").read_text()
    assert "target 2" in summary and "## Target 1" in summary
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "target 1" in capsys.readouterr().out


def test_threshold_benchmark_compares_both_kernels_and_restores_the_thresholds(tmp_path, capsys):
    from adanorm.functional import cpu_fused
    from benchmarks import thresholds

    before = {name: getattr(cpu_fused, name) for name in thresholds.THRESHOLDS}
    assert thresholds.main(["--modes", "layer", "--shapes", "quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert {name: getattr(cpu_fused, name) for name in thresholds.THRESHOLDS} == before
    rows = list(csv.DictReader((tmp_path / "thresholds.csv").open()))
    assert len(rows) == 3 * 2 * 2 * 2  # shapes x dtypes x layouts x passes
    assert all(float(row["compiled_us"]) > 0 and float(row["native_us"]) > 0 for row in rows)
    assert "compiled / native" in capsys.readouterr().out
