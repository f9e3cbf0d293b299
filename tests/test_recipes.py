"""The Hydra recipes: every config group composes, every model trains under Lightning, train.py runs end to end."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from adanorm import AdaptiveNorm
from adanorm.recipes.run import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
GROUPS = ("model", "norm", "data", "trainer")
SEGMENTATION_MODELS = ("unet", "basic_unet", "dynunet", "segresnet")
NATIVE_NORMS = {"batch": nn.BatchNorm3d, "instance": nn.InstanceNorm3d, "group": nn.GroupNorm}


def options(group):
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def compose_config(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def tiny(data_root, output_dir, model="unet"):
    """Overrides for a seconds-long run: 4 volumes of 24^3, 16^3 patches, batch 2."""
    overrides = [f"model={model}", f"data.root={data_root}", "data.num_volumes=4", "data.volume_size=24",
                 "data.patch_size=[16,16,16]", "data.samples_per_volume=1", f"output_dir={output_dir}"]
    if model == "resnet":
        overrides.append("model.net.widen_factor=0.25")
    return overrides


def one_epoch():
    return ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]


def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, (_NormBase, nn.GroupNorm, AdaptiveNorm))]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny recipe runs: threads only add overhead


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_group_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_config(f"{group}={option}", "data.root=/data", f"output_dir={tmp_path}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["module"]["net"]["_target_"]
    assert resolved["data"]["task"] == resolved["model"]["task"]


def test_config_groups_offer_what_the_recipes_promise():
    assert set(options("model")) == {*SEGMENTATION_MODELS, "resnet"}
    assert set(options("norm")) == {"adaptive", *NATIVE_NORMS}
    assert set(options("data")) >= {"synthetic", "nifti_folder", "mni152"}
    assert set(options("trainer")) >= {"cpu", "gpu", "ddp"}
    defaults = compose_config("data.root=/data")
    assert defaults.norm.name == "adaptive" and defaults.model.net._target_.endswith("UNet")


@pytest.mark.parametrize("model", [*SEGMENTATION_MODELS, "resnet"])
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


@pytest.mark.parametrize("model", [*SEGMENTATION_MODELS, "resnet"])
def test_each_model_runs_fast_dev_run(model, data_root, tmp_path):
    train(compose_config(*tiny(data_root, tmp_path, model), "+trainer.fast_dev_run=true"))


@pytest.mark.parametrize("norm", list(NATIVE_NORMS))
def test_native_norms_run_fast_dev_run(norm, data_root, tmp_path):
    train(compose_config(*tiny(data_root, tmp_path), f"norm={norm}", "+trainer.fast_dev_run=true"))


def test_mni152_tissue_runs_fast_dev_run(tmp_path):
    pytest.importorskip("nilearn")
    train(compose_config("data=mni152", f"data.root={tmp_path}", "data.patch_size=[16,16,16]",
                         "data.samples_per_volume=2", f"output_dir={tmp_path}", "+trainer.fast_dev_run=true"))


def read_metrics(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_logs_norm_modes_writes_plots_and_resumes(data_root, tmp_path):
    first = tmp_path / "first"
    train(compose_config(*tiny(data_root, first), *one_epoch()))
    assert {p.name for p in first.iterdir()} >= {"curves.png", "norm_modes.png", "checkpoints", "csv"}
    assert (first / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(first / "csv" / "metrics.csv")
    logged = {key: float(value) for row in rows for key, value in row.items() if value}
    assert "val/dice" in logged
    # batch 2 is below the default policy's min_batch_size 8: every training forward falls back to instance
    assert logged["norm/train/fallback_fraction"] == 1.0
    assert logged["norm/eval/fallback_fraction"] == 0.0
    assert logged["norm/train/net.model.0.adn.N/instance"] == 2.0

    resumed = tmp_path / "resumed"
    train(compose_config(*tiny(data_root, resumed), *one_epoch(), "trainer.max_epochs=2",
                         f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"))
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 4


def test_train_script_sweeps_norms_end_to_end(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "train.py", "-m", "norm=adaptive,batch", *tiny(data_root, "${hydra:runtime.output_dir}"),
               *one_epoch(), f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best val/dice" in result.stdout
    adaptive_run, batch_run = sweep / "0", sweep / "1"
    for run in (adaptive_run, batch_run):
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "curves.png").is_file()
        assert (run / "csv" / "metrics.csv").is_file() and (run / "train.log").is_file()
    assert (adaptive_run / "norm_modes.png").is_file()
    assert not (batch_run / "norm_modes.png").exists(), "a model without adaptive layers has no mode plot"
