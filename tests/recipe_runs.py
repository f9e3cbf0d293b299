"""Helpers the recipe tests share (not tests): short runs of the recipes, scans to predict on, predict.py."""
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
from hydra import compose, initialize_config_module

from adanorm.recipes.run import train

REPO = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("predict_script", REPO / "predict.py")
predict_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(predict_script)


def compose_config(*overrides, return_hydra_config=False):
    with initialize_config_module(config_module="adanorm.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def tiny(data_root, output_dir=None, model="unet"):
    """Overrides for a seconds-long run: 4 volumes of 24^3, 16^3 patches, batch 2 (label checks cached in data_root)."""
    overrides = [f"model={model}", f"data.root={data_root}", "data.num_volumes=4", "data.volume_size=24",
                 "data.patch_size=[16,16,16]", "data.samples_per_volume=1", f"data.label_cache={data_root}/label_checks.json"]
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    if model == "resnet":
        overrides.append("model.net.widen_factor=0.25")
    return overrides


def one_epoch():
    return ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1"]


def trained_checkpoint(tmp_path, model):
    output = tmp_path / model
    train(compose_config(*tiny(tmp_path / "data", output, model), *one_epoch()))
    return output / "checkpoints" / "last.ckpt"


def write_scan(path, shape, affine):
    """An int16 scan with scaling, an oblique affine and a description: all must survive prediction."""
    data = (np.random.RandomState(1).rand(*shape) * 1000).astype(np.int16)
    image = nib.Nifti1Image(data, affine)
    image.header["descrip"] = b"scanner X"
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, path)
    return path
