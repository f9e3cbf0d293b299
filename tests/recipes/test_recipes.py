"""The Hydra recipes: every config group composes, every model trains under Lightning, train.py runs end to end."""
import csv
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import adanorm.configs
import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError
from recipe_runs import REPO, compose_config, one_epoch, tiny
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from adanorm import AdaptiveNorm
from adanorm.integrations.lightning import NormMetric
from adanorm.recipes.data import VolumeDataError
from adanorm.recipes.errors import ConfigError
from adanorm.recipes.quiet import quiet_third_party
from adanorm.recipes.resume import FirstRun, with_first_run_overrides
from adanorm.recipes.run import train

CONFIGS = Path(adanorm.configs.__file__).parent  # shipped inside the package: pkg://adanorm.configs
GROUPS = ("model", "norm", "data", "trainer")
SEGMENTATION_MODELS = ("unet", "basic_unet", "dynunet", "segresnet")
CLASSIFICATION_MODELS = ("resnet", "r2plus1d")
NATIVE_NORMS = {"batch": nn.BatchNorm3d, "instance": nn.InstanceNorm3d, "group": nn.GroupNorm}
FIXED_PRESETS = {"default": 0.1, "small_batch": 0.05, "tiny_batch": 0.01, "cumulative": None}
NOISE = ("LeafSpec", "litlogger")  # third-party messages every run printed before train.py silenced them


def options(group):
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, (_NormBase, nn.GroupNorm, AdaptiveNorm))]


def read_metrics(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def train_script(cwd, *overrides):
    """train.py in a subprocess (Hydra's own run folder logic included): the finished process."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_train_script(cwd, *overrides):
    """train.py in a subprocess, which must succeed; returns stdout + stderr."""
    result = train_script(cwd, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def write_segmentation_folder(root, cases="abcd", shape=(16, 16, 16)):
    """A nifti_folder data set: random images, each labelled where it is above 0.5."""
    for index, case in enumerate(cases):
        image = np.random.RandomState(index).rand(*shape).astype(np.float32)
        for folder, volume in (("imagesTr", image), ("labelsTr", (image > 0.5).astype(np.uint8))):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), root / folder / f"{case}.nii.gz")
    return root


def best_checkpoint_state(checkpoint_path):
    """What ModelCheckpoint recorded as the best epoch of a run: (score, epoch from the best file's name)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    (state,) = [state for name, state in checkpoint["callbacks"].items()
                if name.startswith("ModelCheckpoint") and state.get("monitor") == "val/dice"]
    return float(state["best_model_score"]), int(Path(state["best_model_path"]).stem.removeprefix("best-epoch"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tiny recipe runs: threads only add overhead


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_group_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_config(f"{group}={option}", "data.root=/data", f"output_dir={tmp_path}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["module"]["net"]["_target_"]
    assert resolved["data"]["task"] == resolved["task"]["name"]
    assert resolved["module"]["_target_"] == resolved["task"]["module"]
    monitors = [c["monitor"] for c in resolved["trainer"]["callbacks"] if c["_target_"].endswith("ModelCheckpoint")]
    assert monitors == [resolved["task"]["monitor"], None]


def test_config_groups_offer_what_the_recipes_promise():
    assert set(options("model")) == {*SEGMENTATION_MODELS, *CLASSIFICATION_MODELS}
    assert set(options("norm")) == {"adaptive", *NATIVE_NORMS}
    assert set(options("data")) >= {"synthetic", "nifti_folder", "mni152", "video_folder", "moving_digits"}
    assert set(options("trainer")) >= {"cpu", "gpu", "ddp"}
    assert set(options("task")) == {"segmentation", "classification"}
    defaults = compose_config("data.root=/data")
    assert defaults.norm.args[0] == "adaptive" and defaults.model.net._target_.endswith("UNet")
    assert "tasks" not in defaults, "the task config group replaced the lookup table"
    for norm in options("norm"):
        assert "name" not in OmegaConf.load(CONFIGS / "norm" / f"{norm}.yaml"), "unused key"


@pytest.mark.parametrize("model, task, module", [
    *[(m, "segmentation", "SegmentationModule") for m in SEGMENTATION_MODELS],
    *[(m, "classification", "ClassificationModule") for m in CLASSIFICATION_MODELS],
])
def test_model_selects_its_task_config(model, task, module, tmp_path):
    cfg = compose_config(f"model={model}", "data.root=/data", f"output_dir={tmp_path}")
    assert cfg.task.name == task and cfg.module._target_ == f"adanorm.recipes.module.{module}"
    assert type(instantiate(cfg.module)).__name__ == module


@pytest.mark.parametrize("model", [*SEGMENTATION_MODELS, *CLASSIFICATION_MODELS])
@pytest.mark.parametrize("norm", ["adaptive", *NATIVE_NORMS])
def test_selected_norm_reaches_every_layer(model, norm, tmp_path):
    cfg = compose_config(*tiny(tmp_path, tmp_path, model), f"norm={norm}")
    layers = norm_layers(instantiate(cfg.module).net)
    expected = AdaptiveNorm if norm == "adaptive" else NATIVE_NORMS[norm]
    assert layers and all(isinstance(layer, expected) for layer in layers)


def test_preset_override_sets_every_adaptive_layers_momentum(tmp_path):
    for model in ("unet", "resnet"):
        cfg = compose_config(*tiny(tmp_path, tmp_path, model), "norm.preset=small_batch")
        presets = {layer.momentum_preset.name for layer in norm_layers(instantiate(cfg.module).net)}
        assert presets == {"small_batch"}


@pytest.mark.parametrize("preset, momentum", FIXED_PRESETS.items())
def test_preset_sets_native_batch_norm_momentum(preset, momentum, tmp_path):
    for model in ("unet", "resnet"):
        cfg = compose_config(*tiny(tmp_path, tmp_path, model), "norm=batch", f"norm.preset={preset}")
        layers = norm_layers(instantiate(cfg.module).net)
        assert layers and {layer.momentum for layer in layers} == {momentum}
        assert all(isinstance(layer, nn.BatchNorm3d) for layer in layers)


def test_batch_norm_default_momentum_is_pytorchs(tmp_path):
    cfg = compose_config(*tiny(tmp_path, tmp_path), "norm=batch")
    assert {layer.momentum for layer in norm_layers(instantiate(cfg.module).net)} == {nn.BatchNorm3d(1).momentum}


def test_batch_size_dependent_preset_is_refused_for_native_batch_norm(tmp_path):
    cfg = compose_config(*tiny(tmp_path, tmp_path), "norm=batch", "norm.preset=auto")
    with pytest.raises(InterpolationResolutionError, match=r"preset=auto.*batch size.*norm=adaptive norm\.preset=auto"):
        instantiate(cfg.module)


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_preset_is_refused_where_there_are_no_running_statistics(norm, tmp_path):
    for override in ("norm.preset=small_batch", "+norm.preset=small_batch"):  # `+norm.preset=` was silently ignored
        cfg = compose_config(*tiny(tmp_path, tmp_path), f"norm={norm}", override)
        with pytest.raises(InterpolationResolutionError, match=rf"norm={norm} keeps no running statistics.*drop norm\.preset"):
            instantiate(cfg.module)


def test_appending_a_preset_to_batch_norm_is_not_silently_ignored(tmp_path):
    with pytest.raises(ConfigCompositionException, match="already at 'norm.preset'"):
        compose_config(*tiny(tmp_path, tmp_path), "norm=batch", "+norm.preset=small_batch")


@pytest.mark.parametrize("model", [*SEGMENTATION_MODELS, "resnet"])
def test_each_model_runs_fast_dev_run(model, data_root, tmp_path):
    train(compose_config(*tiny(data_root, tmp_path, model), "+trainer.fast_dev_run=true"))


@pytest.mark.parametrize("norm", list(NATIVE_NORMS))
def test_native_norms_run_fast_dev_run(norm, data_root, tmp_path):
    train(compose_config(*tiny(data_root, tmp_path), f"norm={norm}", "+trainer.fast_dev_run=true"))


def test_mni152_tissue_runs_fast_dev_run(tmp_path):
    pytest.importorskip("nilearn")
    train(compose_config("data=mni152", f"data.root={tmp_path}", "data.patch_size=[16,16,16]",
                         "data.samples_per_volume=2", f"data.label_cache={tmp_path}/label_checks.json",
                         f"output_dir={tmp_path}", "+trainer.fast_dev_run=true"))


def test_bad_label_stops_the_run_before_training_naming_the_file(tmp_path):
    for case in "abc":
        image = np.random.RandomState(0).rand(16, 16, 16).astype(np.float32)
        label = (image > 0.5).astype(np.uint8) * (2 if case == "b" else 1)  # a 3-class data set without data.num_classes=3
        for folder, volume in (("imagesTr", image), ("labelsTr", label)):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "data" / folder / f"{case}.nii.gz")
    output = tmp_path / "run"
    cfg = compose_config("data=nifti_folder", f"data.root={tmp_path / 'data'}", "data.patch_size=[16,16,16]",
                         f"data.label_cache={tmp_path}/label_checks.json", f"output_dir={output}", *one_epoch())
    with pytest.raises(VolumeDataError, match=r"classes \[0, 1, 2\].*labelsTr/b\.nii\.gz holds class 2.*data\.num_classes=3"):
        train(cfg)
    assert not (output / "checkpoints").exists(), "the check runs before the first step"


def test_run_logs_norm_modes_writes_plots_and_resumes_with_weights_only(data_root, tmp_path, monkeypatch):
    first = tmp_path / "first"
    train(compose_config(*tiny(data_root, first), *one_epoch()))
    assert {p.name for p in first.iterdir()} >= {"curves.png", "norm_modes.png", "checkpoints", "csv"}
    assert (first / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(first / "csv" / "metrics.csv")
    logged = {key: float(value) for row in rows for key, value in row.items() if value}
    assert "val/dice" in logged
    # batch 2 is below the default policy's min_batch_size 32: every training forward runs group mode (the
    # UNet's first layer has 16 channels: 8 groups of 2), as designed, which is no fallback
    assert logged["norm/train/fallback_fraction"] == 0.0
    assert logged["norm/eval/fallback_fraction"] == 0.0
    assert logged["norm/train/net.model.0.adn.N/group"] == 2.0
    assert logged["norm/train/net.model.0.adn.N/instance"] == 0.0
    assert all(NormMetric.parse(key) for key in logged if key.startswith("norm/")), "plots.py reads what the monitor writes"

    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    train(compose_config(*tiny(data_root, first), *one_epoch(), "trainer.max_epochs=2",
                         f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"))
    assert loads and all(weights_only is True for weights_only in loads), loads  # issue #12: every user file
    checkpoint = real_load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 4


def test_resume_refuses_a_config_that_builds_another_network(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    adaptive = compose_config(*tiny(tmp_path, tmp_path))
    torch.save({"hyper_parameters": {"net": OmegaConf.to_container(adaptive.module.net, resolve=True)}}, checkpoint)
    with pytest.raises(ConfigError, match=r"trained something else \(net\.norm: \['adaptive'.* in the first run, "
                                          r"\['batch'.*now\)"):
        train(compose_config(*tiny(tmp_path, tmp_path), "norm=batch", f"ckpt_path={checkpoint}"))


def test_last_checkpoint_is_the_latest_epoch_and_resume_continues_the_run_folder(data_root, tmp_path):
    run = tmp_path / "run"
    # lr=0: every epoch scores exactly the same Dice, so the best epoch stays 0 and is never the last one
    settings = [*tiny(data_root), "model.lr=0.0", *one_epoch()[1:]]
    first = run_train_script(tmp_path, *settings, "trainer.max_epochs=2", f"hydra.run.dir={run}")
    assert not [noise for noise in NOISE if noise in first], first[-3000:]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 4, "last.ckpt must hold the latest epoch"
    best_line = next(line for line in first.splitlines() if line.startswith("best val/dice"))

    # Resume from a relative path, in another working directory: the run continues in its own folder.
    resumed = run_train_script(tmp_path, *settings, "trainer.max_epochs=3", "ckpt_path=run/checkpoints/last.ckpt")
    assert "won't be reloaded" not in resumed and not [noise for noise in NOISE if noise in resumed], resumed[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no second run folder"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 6
    assert next(line for line in resumed.splitlines() if line.startswith("best val/dice")) == best_line, \
        "the best checkpoint is the best of the whole run"
    rows = read_metrics(run / "csv" / "metrics.csv")
    assert [row["epoch"] for row in rows if row["val/dice"]] == ["0", "1", "2"], "one metrics.csv, every epoch once"
    assert (run / "curves.png").is_file() and (run / "norm_modes.png").is_file()
    hydra_dir = run / ".hydra"
    assert "trainer.max_epochs=2" in (hydra_dir / "overrides.yaml").read_text(), "the first run's config is kept"
    (resumed_config,) = hydra_dir.glob("resumed-*")
    assert "ckpt_path=run/checkpoints/last.ckpt" in (resumed_config / "overrides.yaml").read_text()


@pytest.mark.slow
def test_resume_trains_on_the_first_runs_data_and_refuses_another(tmp_path):
    """The documented resume form (docs/recipes.md) (ckpt_path= and trainer.max_epochs= only) continues a run on its own data set;
    a resume that changes the norm or the data is refused in a few lines naming both differences."""
    data = write_segmentation_folder(tmp_path / "scans")
    run = tmp_path / "run"
    # lr=0: every epoch scores exactly the same Dice on the same data, and another data set would score another
    run_train_script(tmp_path, "data=nifti_folder", f"data.root={data}", "data.patch_size=[16,16,16]",
                     f"data.label_cache={tmp_path}/label_checks.json", "model.lr=0.0", "+trainer.limit_train_batches=2",
                     "trainer.log_every_n_steps=1", "trainer.max_epochs=1", f"hydra.run.dir={run}")

    refused = train_script(tmp_path, "ckpt_path=run/checkpoints/last.ckpt", "trainer.max_epochs=2", "norm=batch",
                           f"data.root={write_segmentation_folder(tmp_path / 'other', cases='wxyz')}")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert len(refused.stderr.strip().splitlines()) <= 5, refused.stderr
    assert "norm=adaptive in the first run, norm=batch now" in refused.stderr
    assert f"data.root: '{data}' in the first run, '{tmp_path / 'other'}' now" in refused.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]

    run_train_script(tmp_path, "ckpt_path=run/checkpoints/last.ckpt", "trainer.max_epochs=2")
    (resumed,) = [folder for folder in (run / ".hydra").glob("resumed-*") if (folder / "config.yaml").is_file()
                  and "norm=batch" not in (folder / "overrides.yaml").read_text()]
    config = OmegaConf.load(resumed / "config.yaml")
    assert config.data._target_.endswith(".NiftiFolder") and config.data.root == str(data)
    assert config.model.lr == 0.0 and config.trainer.max_epochs == 2 and config.trainer.limit_train_batches == 2
    assert OmegaConf.load(resumed / "hydra.yaml").hydra.runtime.choices.data == "nifti_folder"
    dice = {row["epoch"]: row["val/dice"] for row in read_metrics(run / "csv" / "metrics.csv") if row["val/dice"]}
    assert list(dice) == ["0", "1"] and dice["1"] == dice["0"], "the resumed epoch validates on the first run's data"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1


def test_resume_puts_the_first_runs_overrides_ahead_of_the_command_line(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    first = ["data=nifti_folder", "data.root=/scans", "+trainer.limit_train_batches=2", "trainer.max_epochs=2"]
    OmegaConf.save(OmegaConf.create(first), run / ".hydra" / "overrides.yaml")
    ckpt_path = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"

    restored = with_first_run_overrides([ckpt_path, "trainer.max_epochs=3", "trainer.limit_train_batches=3"])
    assert restored == ["data=nifti_folder", "data.root=/scans", ckpt_path, "trainer.max_epochs=3",
                        "++trainer.limit_train_batches=3"]
    cfg = compose_config(*restored, f"output_dir={tmp_path}")
    assert cfg.data.root == "/scans" and cfg.trainer.max_epochs == 3 and cfg.trainer.limit_train_batches == 3
    # the first command repeated with ckpt_path= added, as a resubmitted cluster job does: no key twice
    assert with_first_run_overrides([*first, ckpt_path]) == [*first, ckpt_path]
    assert with_first_run_overrides(["norm=batch"]) == ["norm=batch"], "no ckpt_path: nothing restored"
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=missing\.ckpt is not a file.*checkpoints/last\.ckpt"):
        with_first_run_overrides(["ckpt_path=missing.ckpt"])


def test_a_resume_may_change_how_it_runs_but_not_what_it_trains(tmp_path):
    def composed(*overrides):
        cfg = compose_config(*overrides, "data=nifti_folder", return_hydra_config=True)
        return cfg, OmegaConf.to_container(cfg.hydra.runtime.choices)

    def config(cfg):
        plain = OmegaConf.to_container(cfg, resolve=False)
        del plain["hydra"]
        return plain

    first_cfg, first_choices = composed("data.root=scans")
    first = FirstRun(config(first_cfg), first_choices, cwd="/first")

    def changes(*overrides, cwd="/first"):
        cfg, choices = composed(*overrides)
        return first.differences(OmegaConf.create(config(cfg)), choices, cwd)

    assert changes("data.root=scans", "trainer.max_epochs=90", "trainer.devices=2", "data.num_workers=4",
                   "data.cache_rate=0.5", "recalibrate=true", "verbose=true", "ckpt_path=x.ckpt", "trainer=gpu") == []
    assert changes("data.root=/first/scans") == [], "the same folder, named from anywhere"
    assert changes("data.root=scans", cwd="/elsewhere") == ["data.root: '/first/scans' in the first run, '/elsewhere/scans' now"]
    assert changes("data.root=scans", "norm=batch") == ["norm=adaptive in the first run, norm=batch now"]
    assert changes("data.root=scans", "model=dynunet") == ["model=unet in the first run, model=dynunet now"]
    assert changes("data.root=scans", "data.patch_size=[16,16,16]", "seed=1", "model.lr=0.1") == [
        "data.patch_size: [32, 32, 32] in the first run, [16, 16, 16] now",
        "model.lr: 0.003 in the first run, 0.1 now",
        "seed: 0 in the first run, 1 now",
    ]


def test_quiet_runs_drop_only_the_named_third_party_messages(tmp_path):
    import lightning.pytorch as pl
    import lightning_utilities.core.rank_zero as rank_zero
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils._pytree import LeafSpec

    infos = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: infos.append(record.getMessage())
    rank_zero.log.addHandler(handler)  # the logger Lightning's rank_zero_info writes to
    level, rank_zero.log.level = rank_zero.log.level, logging.INFO
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_third_party():
                pl.Trainer(logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False)
                LeafSpec()
                rank_zero.rank_zero_info("kept info")
                warnings.warn("kept warning", UserWarning, stacklevel=1)
            pl.Trainer(logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False)
            LeafSpec()
    finally:
        rank_zero.log.removeHandler(handler)
        rank_zero.log.level = level
    messages = [str(warning.message) for warning in caught]
    assert "kept warning" in messages and "kept info" in infos
    assert sum("LeafSpec" in message for message in messages) == 1, "silenced inside only"
    assert sum("litlogger" in message for message in infos) == 1, "silenced inside only"


def test_train_script_sweeps_norms_end_to_end_and_summarizes_the_sweep(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    output = run_train_script(REPO, "-m", "norm=adaptive,batch", *tiny(data_root, "${hydra:runtime.output_dir}"),
                              *one_epoch(), "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}")
    assert "best val/dice" in output
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    adaptive_run, batch_run = sweep / "0", sweep / "1"
    for run in (adaptive_run, batch_run):
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "curves.png").is_file()
        assert (run / "csv" / "metrics.csv").is_file() and (run / "train.log").is_file()
    assert (adaptive_run / "norm_modes.png").is_file()
    assert not (batch_run / "norm_modes.png").exists(), "a model without adaptive layers has no mode plot"

    rows = read_metrics(sweep / "sweep_summary.csv")
    assert [row["job"] for row in rows] == ["0", "1"]
    table = output[output.index("sweep summary"):].splitlines()
    assert table[1].split() == ["overrides", "monitor", "best", "epoch", "run"]
    for row, run, norm, line in zip(rows, (adaptive_run, batch_run), ("adaptive", "batch"), table[2:]):
        score, epoch = best_checkpoint_state(run / "checkpoints" / "last.ckpt")  # what picked the best checkpoint
        assert f"norm={norm}" in row["overrides"].split() and "trainer.max_epochs=2" in row["overrides"].split()
        assert row["monitor"] == "val/dice" and row["status"] == "completed" and row["run_dir"] == str(run)
        assert float(row["best"]) == pytest.approx(score, rel=1e-6) and int(row["epoch"]) == epoch
        assert line.split() == [f"norm={norm}", "val/dice", f"{score:.4f}", str(epoch), str(run)], \
            "the table shows what differs between jobs"


def test_recalibrate_recomputes_running_statistics_before_validation(tmp_path):
    """recalibrate=true: validation and the checkpoints use statistics from adanorm.update_bn, although the
    layers train in group mode at this batch size (batch 2 < min_batch_size)."""
    train(compose_config(*tiny(tmp_path / "data", tmp_path / "run"), *one_epoch(), "recalibrate=true",
                         "recalibrate_batches=2"))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    counters = [v for k, v in checkpoint["state_dict"].items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(counter) == 2 for counter in counters)
