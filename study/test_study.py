"""Checks of the study's pieces that need no training run: ``pytest study/test_study.py`` (a few seconds).

The data variant, the runner's cell bookkeeping (resume, shards, protocol tag) and the report on a made-up CSV.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest

from study import report, run


def test_synthetic_hard_volumes_are_deterministic_and_hold_every_class(tmp_path):
    from adanorm.recipes.generators import SyntheticHardVolumes

    data = SyntheticHardVolumes(root=str(tmp_path), task="segmentation", num_volumes=3, volume_size=24, seed=1)
    image, label = data.volume(0)
    again, label_again = SyntheticHardVolumes(root=str(tmp_path), task="segmentation", num_volumes=3, volume_size=24,
                                              seed=1).volume(0)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape == (24, 24, 24)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(label, label_again)
    assert set(np.unique(label)) == {0, 1, 2}
    other, _ = SyntheticHardVolumes(root=str(tmp_path), task="segmentation", num_volumes=3, volume_size=24, seed=2).volume(0)
    assert not np.array_equal(image, other)
    assert data.signature() != SyntheticHardVolumes(root=str(tmp_path), task="segmentation", num_volumes=3,
                                                    volume_size=24, seed=1, contrast=0.3).signature()


def test_synthetic_hard_writes_a_folder_the_recipe_reads(tmp_path):
    from adanorm.recipes.generators import SyntheticHardVolumes

    data = SyntheticHardVolumes(root=str(tmp_path), task="segmentation", num_volumes=5, volume_size=16,
                                patch_size=(8, 8, 8), val_fraction=0.4, label_cache=None)
    data.prepare_data()
    training, validation = data.check()
    assert (len(training), len(validation)) == (3, 2)


def test_synthetic_hard_refuses_classification():
    from adanorm.recipes.generators import SyntheticHardVolumes
    from adanorm.recipes.layouts import VolumeDataError

    with pytest.raises(VolumeDataError, match="segmentation"):
        SyntheticHardVolumes(task="classification")


def test_cells_resume_and_shards(tmp_path):
    grid = run.cells([1, 2], ["batch", "adaptive"], [0, 1])
    assert len(grid) == 8 and grid[0] == (1, "batch", 0) and grid[4][2] == 1  # seed-major
    path = tmp_path / "runs.csv"
    run.append_row(path, {"data": "d", "protocol": "p", "batch": 1, "norm": "batch", "seed": 0, "status": "ok"})
    run.append_row(path, {"data": "d", "protocol": "p", "batch": 2, "norm": "batch", "seed": 0, "status": "failed"})
    assert run.done_cells(path) == {("d", "p", 1, "batch", 0)}  # a failed cell runs again
    with path.open() as handle:
        assert next(csv.reader(handle)) == run.FIELDS


def test_batch_overrides_keep_the_step_count():
    for batch in (1, 2, 4, 8, 16):
        overrides = dict(item.split("=") for item in run.synthetic_hard_batch(batch, 32))
        assert int(overrides["data.repeats"]) * 32 // batch == 32
    with pytest.raises(ValueError):
        run.synthetic_hard_batch(1, 10)  # 10 steps of 1 patch cannot cover whole passes over 32 volumes


def test_protocol_tag_follows_the_settings():
    tag = run.protocol_tag("synthetic_hard", 6, 32, [])
    assert tag == run.protocol_tag("synthetic_hard", 6, 32, [])
    assert tag != run.protocol_tag("synthetic_hard", 6, 32, ["data.contrast=0.3"])
    assert tag != run.protocol_tag("synthetic_hard", 7, 32, [])


def test_report_on_made_up_runs(tmp_path):
    rows = []
    for seed in range(3):
        for batch in (2, 8):
            for norm, dice in (("batch", 0.5), ("instance", 0.6), ("group", 0.62), ("adaptive", 0.6 if batch < 8 else 0.5)):
                rows.append({"data": "d", "protocol": "p", "batch": batch, "norm": norm, "seed": seed, "status": "ok",
                             "val_dice": dice + 0.01 * seed, "val_dice_best": dice, "train_mode_dice": dice,
                             "train_eval_gap": 0.0, "total_s": 1.0})
    path = tmp_path / "runs.csv"
    for row in rows:
        run.append_row(path, row)
    report.main(["--runs", str(path), "--out", str(tmp_path)])
    text = (tmp_path / "study.md").read_text()
    assert "| 8 | adaptive | group |" in text and "behind" in text
    assert (tmp_path / "study.png").stat().st_size > 0
    summary = list(csv.DictReader((tmp_path / "study.csv").open()))
    assert len(summary) == 8
