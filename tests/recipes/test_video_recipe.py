"""The video recipe: moving digits written as real MP4 files, a folder of clips read through PyAV, its errors,
and a tiny adanorm-train run with its checkpoint, plots, resume and adanorm-predict on MP4 files."""
import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from adanorm import AdaptiveNorm
from adanorm.recipes.cli import predict_main
from adanorm.recipes.errors import describe, user_error
from adanorm.recipes.inference import OutputConflictError, predict
from adanorm.recipes.module import INPUTS_KEY
from adanorm.recipes.run import train
from adanorm.recipes.video import MovingDigits, VideoDataError, VideoFolder, read_video, write_video

av = pytest.importorskip("av")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tiny recipe runs: threads only add overhead

def compose_config(*overrides):
    with initialize_config_module(config_module="adanorm.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def read_metrics(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


TINY_DIGITS = {"num_clips": 24, "frames": 8, "size": 16, "digit_size": 6.0, "speeds": (0.3, 1.0), "batch_size": 4,
               "clips_per_epoch": None, "val_fraction": 0.15}
"""Moving digits small enough for seconds-long runs: 8 classes, 8×16×16 clips, 8 for validation (one per class)
and 16 for training."""


def tiny_video_run(root, output_dir, *overrides, model="r2plus1d"):
    """Overrides for a seconds-long adanorm-train run on TINY_DIGITS with a narrow network, one epoch."""
    settings = [f"data.{key}={'null' if value is None else list(value) if isinstance(value, tuple) else value}"
                for key, value in TINY_DIGITS.items()]
    narrow = ["model.net.widths=[8,8,8,8]"] if model == "r2plus1d" else ["model.net.depth=10", "model.net.widen_factor=0.25"]
    return ["data=moving_digits", f"model={model}", f"data.root={root}", *settings, *narrow,
            f"output_dir={output_dir}", "trainer.max_epochs=1", "trainer.log_every_n_steps=1", *overrides]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """TINY_DIGITS written once for the module."""
    root = tmp_path_factory.mktemp("moving_digits")
    MovingDigits(root=str(root), **TINY_DIGITS).prepare_data()
    return root


def dataset_folder(root):
    (folder,) = [path for path in Path(root).iterdir() if path.is_dir()]
    return folder


def rows(csv_path):
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_moving_digits_are_real_mp4_files_with_balanced_labels(digits_root, tmp_path):
    folder = dataset_folder(digits_root)
    assert folder.name.startswith("digits-n24-8x16x16-c8-") and not folder.name.endswith("partial")
    listed = rows(folder / "labels.csv")
    assert list(listed[0]) == ["file", "label", "split"] and len(listed) == 24
    assert sorted(int(row["label"]) for row in listed) == sorted(list(range(8)) * 3)
    assert {row["label"] for row in listed if row["split"] == "val"} == {str(label) for label in range(8)}
    data = MovingDigits(root=str(digits_root), **TINY_DIGITS)
    for index, row in enumerate(listed[:3]):
        path = folder / row["file"]
        assert path.read_bytes()[4:8] == b"ftyp", "an MP4 container"
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.codec_context.format.name) in {("h264", "yuv420p"), ("mpeg4", "yuv420p")}
        clip = read_video(path)
        assert clip.shape == (8, 16, 16, 1) and clip.dtype == np.uint8
        rng = np.random.RandomState(index)  # seed 0: clip i is drawn from RandomState(i)
        pool = "val" if row["split"] == "val" else "train"
        assert pool == "val"  # the validation clips come first
        # the decoded frames are the generated ones up to the codec's rounding (crf 10)
        from sklearn.datasets import load_digits
        images = load_digits().images / 16.0
        order = np.random.RandomState(0).permutation(len(images))
        expected = data.clip(rng, images[order[:round(len(images) * data.val_fraction)]], int(row["label"]))
        assert np.abs(clip[..., 0].astype(int) - expected).mean() < 2.0

    # Deterministic, and an existing data set is read, never rewritten.
    again = tmp_path / "again"
    MovingDigits(root=str(again), **TINY_DIGITS).prepare_data()
    assert (dataset_folder(again) / "labels.csv").read_bytes() == (folder / "labels.csv").read_bytes()
    first_clip = folder / listed[0]["file"]
    assert (dataset_folder(again) / listed[0]["file"]).read_bytes() == first_clip.read_bytes()
    stamp = first_clip.stat().st_mtime_ns
    data.prepare_data()
    assert first_clip.stat().st_mtime_ns == stamp and [p.name for p in digits_root.iterdir()] == [folder.name]


def test_moving_digits_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(VideoDataError, match=r"data.num_classes=8"):
        MovingDigits(root=str(tmp_path), num_classes=4)
    with pytest.raises(VideoDataError, match="crosses more than"):
        MovingDigits(root=str(tmp_path), speeds=(0.4, 3.0))
    with pytest.raises(VideoDataError, match="model=r2plus1d or model=resnet"):
        MovingDigits(root=str(tmp_path), task="segmentation")


def test_write_video_needs_even_frames_and_leaves_no_temporary_file(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "odd.mp4", np.zeros((4, 15, 16), np.uint8))
    frames = np.random.RandomState(0).randint(0, 256, size=(5, 16, 20, 3)).astype(np.uint8)
    write_video(tmp_path / "rgb.mp4", frames)
    assert os.listdir(tmp_path) == ["rgb.mp4"]
    assert read_video(tmp_path / "rgb.mp4", in_channels=3).shape == (5, 16, 20, 3)
    assert read_video(tmp_path / "rgb.mp4", in_channels=1).shape == (5, 16, 20, 1)


def write_user_folder(root, labels=(0, 1, 2, 0, 1, 2), frames=12, size=(20, 24), csv_text=None):
    """A user's folder: RGB clips of any length and size, and labels.csv without a split column."""
    root.mkdir(parents=True, exist_ok=True)
    for index in range(len(labels)):
        clip = np.full((frames, *size, 3), 40 * index, np.uint8)
        clip[:, :, :, index % 3] = 250
        write_video(root / f"clip{index}.mp4", clip)
    (root / "labels.csv").write_text(csv_text or "file,label\n" + "".join(f"clip{i}.mp4,{label}\n" for i, label in enumerate(labels)))
    return root


def test_video_folder_reads_a_users_clips_resampled_to_the_clip_size(tmp_path):
    root = write_user_folder(tmp_path / "clips")
    data = VideoFolder(str(root), patch_size=(8, 16, 16), batch_size=2, in_channels=3, num_classes=3)
    data.setup()
    assert (len(data.train_set), len(data.val_set)) == (5, 1)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 16, 16) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["label"].dtype == torch.int64
    assert len(data.train_dataloader()) == 2, "the last, smaller batch is dropped"
    item = data.train_set[0]
    channel = int(Path(item["file"]).stem[-1]) % 3
    assert item["image"][channel].mean() > 0.9, "RGB channels keep their order"
    assert data.input_spec() == {"format": "video", "in_channels": 3}
    data.clips_per_epoch = 9  # more than the 5 training clips: drawn with replacement, 4 full batches of 2
    assert len(data.train_dataloader()) == 4 and len(list(data.train_dataloader())) == 4


@pytest.mark.parametrize("case, message", [
    ("no csv", r"labels\.csv does not exist"),
    ("missing clip", r"line 3 lists 'clip1\.mp4', but .*clip1\.mp4 is not a file"),
    ("undecodable", r"clip2\.mp4 cannot be decoded as a video"),
    ("label out of range", r"line 4: label '3' for clip2\.mp4 is not a class index in 0\.\.2"),
    ("bad header", r"needs a header row 'file,label'"),
    ("bad split", r"split 'test' for clip0\.mp4 is neither"),
])
def test_a_bad_clip_folder_stops_with_one_line_naming_the_file(case, message, tmp_path):
    root = write_user_folder(tmp_path / "clips", labels=(0, 1, 2))
    if case == "no csv":
        (root / "labels.csv").unlink()
    elif case == "missing clip":
        (root / "clip1.mp4").unlink()
    elif case == "undecodable":
        (root / "clip2.mp4").write_bytes((root / "clip2.mp4").read_bytes()[:200])  # cut short by a copy
    elif case == "label out of range":
        (root / "labels.csv").write_text("file,label\nclip0.mp4,0\nclip1.mp4,1\nclip2.mp4,3\n")
    elif case == "bad header":
        (root / "labels.csv").write_text("image,class\nclip0.mp4,0\n")
    elif case == "bad split":
        (root / "labels.csv").write_text("file,label,split\nclip0.mp4,0,test\n")
    data = VideoFolder(str(root), patch_size=(4, 8, 8), batch_size=2, in_channels=3, num_classes=3)
    with pytest.raises(VideoDataError, match=message) as raised:
        data.setup()
    assert user_error(raised.value) is raised.value and "\n" not in describe(raised.value)


def test_video_data_needs_a_classification_model(tmp_path):
    cfg = compose_config("data=video_folder", "model=unet", f"data.root={tmp_path}", f"output_dir={tmp_path}")
    with pytest.raises(Exception) as raised:  # noqa: B017 - Hydra's instantiate wraps it; the CLI prints the cause
        train(cfg)
    assert describe(user_error(raised.value)) == ("video clips carry one class each, but the model selects task=segmentation; "
                                                  "use a classification model: model=r2plus1d or model=resnet.")


@pytest.mark.slow
def test_train_resume_and_predict_on_mp4_files(digits_root, tmp_path, capsys):
    """One epoch, then a resume (in channels-last_3d, which a resume may change), then predictions on MP4 files."""
    run = tmp_path / "run"
    train(compose_config(*tiny_video_run(digits_root, run)))
    assert {path.name for path in run.iterdir()} >= {"checkpoints", "csv", "curves.png", "norm_modes.png"}
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    logged = {key for row in read_metrics(run / "csv" / "metrics.csv") for key, value in row.items() if value}
    assert {"val/accuracy", "val/loss", "train/loss_epoch"} <= logged
    # batch 4 is below the policy's min_batch_size: group statistics by design; the last stage is 1×1×1 on these
    # 8×16×16 clips, where native InstanceNorm3d would raise and the adaptive layers fall back
    assert "norm/train/net.0.1/group" in logged and "norm/train/fallback_fraction" in logged
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint[INPUTS_KEY] == {"format": "video", "in_channels": 1}
    assert checkpoint["hyper_parameters"]["net"]["_target_"] == "adanorm.recipes.models.r2plus1d_resnet"

    train(compose_config(*tiny_video_run(digits_root, run), "trainer.max_epochs=2", "channels_last=true",
                         f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 8  # 16 training clips, batch 4: 4 steps an epoch
    epochs = [row["epoch"] for row in read_metrics(run / "csv" / "metrics.csv") if row["val/accuracy"]]
    assert epochs == ["0", "1"], "one metrics.csv, every epoch once"

    clips = dataset_folder(digits_root) / "clips"
    inputs = [clips / "val_00000.mp4", clips / "val_00001.mp4"]
    output = tmp_path / "predictions"
    capsys.readouterr()
    predict_main([str(run / "checkpoints" / "last.ckpt"), *map(str, inputs), "--output", str(output), "--accelerator", "cpu"])
    printed = capsys.readouterr().out
    written = rows(output / "probabilities.csv")
    assert [row["file"] for row in written] == [str(path) for path in inputs]
    for row in written:
        probabilities = [float(row[f"p_{k}"]) for k in range(8)]
        assert abs(sum(probabilities) - 1.0) < 1e-4 and int(row["predicted"]) == int(np.argmax(probabilities))
        assert f"file={row['file']}, predicted={row['predicted']}" in printed

    before = (output / "probabilities.csv").read_bytes()
    with pytest.raises(OutputConflictError, match="probabilities.csv already exists"):
        predict(run / "checkpoints" / "last.ckpt", clips, output)
    assert (output / "probabilities.csv").read_bytes() == before
    with pytest.raises(OutputConflictError, match="holds the input"):
        predict(run / "checkpoints" / "last.ckpt", clips, clips, overwrite=True)
    predict(run / "checkpoints" / "last.ckpt", clips, output, overwrite=True, accelerator="cpu")  # a folder of clips
    assert len(rows(output / "probabilities.csv")) == 24
    with pytest.raises(FileNotFoundError, match=r"labels\.csv is neither a \.nii/\.nii\.gz file .* video files \(\.mp4"):
        predict(run / "checkpoints" / "last.ckpt", dataset_folder(digits_root) / "labels.csv", tmp_path / "other")
    volume = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), volume)
    with pytest.raises(VideoDataError, match=r"was trained on video clips, but the inputs are NIfTI volumes"):
        predict(run / "checkpoints" / "last.ckpt", volume, tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_monai_resnet_trains_on_the_clips(digits_root, tmp_path):
    run = tmp_path / "resnet"
    train(compose_config(*tiny_video_run(digits_root, run, "+trainer.limit_train_batches=2", model="resnet")))
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "norm_modes.png").is_file()


@pytest.mark.parametrize("norm, expected", [("adaptive", AdaptiveNorm), ("batch", torch.nn.BatchNorm3d),
                                            ("group", torch.nn.GroupNorm), ("instance", torch.nn.InstanceNorm3d)])
def test_r2plus1d_builds_every_norm_layer_with_the_selected_norm(norm, expected, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config(*tiny_video_run(tmp_path, tmp_path), f"norm={norm}")
    net = instantiate(cfg.module).net
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, AdaptiveNorm))]
    assert len(layers) == 21 and all(isinstance(layer, expected) for layer in layers)
    logits = net.train()(torch.rand(2, 1, 16, 32, 32))  # the last stage is 2×2×2: every native norm runs
    assert logits.shape == (2, 8)
