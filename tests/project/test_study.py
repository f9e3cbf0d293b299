"""Checks of the study's pieces that need no training run (a few seconds).

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
                             "metric": "dice", "val_score": dice + 0.01 * seed, "val_score_best": dice, "train_mode_score": dice,
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


def test_video_batches_keep_the_step_count():
    for batch in (8, 16, 32, 64):
        overrides = dict(item.split("=") for item in run.video_batch(batch, 16))
        assert int(overrides["data.batch_size"]) == batch and int(overrides["data.clips_per_epoch"]) == 16 * batch


def test_rows_of_an_older_runner_keep_their_dice_under_the_new_columns(tmp_path):
    path = tmp_path / "runs.csv"
    old = ["data", "protocol", "batch", "norm", "seed", "status", "val_dice", "val_dice_best", "train_mode_dice"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(old)
        writer.writerow(["d", "p", 2, "group", 0, "ok", 0.61, 0.63, 0.55])
    run.append_row(path, {"data": "v", "protocol": "q", "batch": 8, "norm": "group", "seed": 0, "status": "ok",
                          "metric": "accuracy", "val_score": 0.7})
    rows = list(csv.DictReader(path.open()))
    assert [row["metric"] for row in rows] == ["dice", "accuracy"]
    assert (rows[0]["val_score"], rows[0]["val_score_best"], rows[0]["train_mode_score"]) == ("0.61", "0.63", "0.55")
    assert run.done_cells(path) == {("d", "p", 2, "group", 0), ("v", "q", 8, "group", 0)}


def test_report_names_the_video_score_accuracy(tmp_path):
    path = tmp_path / "runs.csv"
    for seed in range(3):
        for norm, accuracy in (("batch", 0.7), ("group", 0.6), ("instance", 0.5), ("adaptive", 0.7)):
            run.append_row(path, {"data": "moving_digits", "protocol": "p", "batch": 32, "norm": norm, "seed": seed,
                                  "status": "ok", "metric": "accuracy", "val_score": accuracy + 0.01 * seed,
                                  "val_score_best": accuracy, "train_mode_score": accuracy, "train_eval_gap": 0.0,
                                  "total_s": 1.0})
    report.main(["--runs", str(path), "--out", str(tmp_path)])
    text = (tmp_path / "study.md").read_text()
    assert "Validation accuracy" in text and "Dice" not in text and "Tile mismatch" not in text
    assert "| 32 | 0.200 ± 0.000 [+0.200, +0.200] | 0.100 ± 0.000 [+0.100, +0.100] |" in text  # batch minus instance, group


def test_the_video_protocol_composes_the_video_recipe():
    cfg = run.compose_config([run.model_override("moving_digits"), *run.DATA["moving_digits"]["overrides"],
                              *run.video_batch(8, 16), "output_dir=/tmp/adanorm-study"])
    assert cfg.data._target_.endswith("MovingDigits") and cfg.model.net._target_.endswith("r2plus1d_resnet")
    assert run.protocol_tag("moving_digits", 8, 16, []) != run.protocol_tag("moving_digits", 8, 16, ["data.jitter=2.0"])


def test_the_min_batch_size_variant_sets_the_default_policys_threshold():
    from hydra.utils import instantiate

    import adanorm

    overrides = run.norm_overrides("adaptive:min_batch_size=8")
    cfg = run.compose_config([run.model_override("moving_digits"), *run.DATA["moving_digits"]["overrides"], *overrides,
                              "output_dir=/tmp/adanorm-study"])
    net = instantiate(cfg.module).net
    layers = [module for module in net.modules() if isinstance(module, adanorm.AdaptiveNorm)]
    assert layers and all(layer.policy == adanorm.Policy(min_batch_size=8) for layer in layers)
    with pytest.raises(SystemExit):
        run.parse_args(["--norms", "adaptive:min_batch_size=eight"])
