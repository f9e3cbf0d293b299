"""A checkpoint is data: predict.py and the loader refuse whatever in it would run code, before it runs.

Every crafted checkpoint starts from a real recipe run and carries a payload with a visible side
effect (a directory it would create, a file a module import would write); each test checks that
the payload was refused with an error naming the key and the flag, and that the side effect did
not happen. The trusted paths show that the payloads are live, so the refusals cannot pass vacuously.
"""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from recipe_runs import compose_config, one_epoch, predict_script, tiny, write_scan

from adanorm.recipes.checkpoint import CheckpointError, load_recipe_module
from adanorm.recipes.module import CLASS_PATH_KEY
from adanorm.recipes.run import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CUSTOM_NETWORK_MODULE = '''
import torch
from torch import nn
import adanorm

class TinyNet(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, channels, 3, padding=1), adanorm.AdaptiveNorm3d(channels), nn.Conv3d(channels, 2, 1))

    def forward(self, x):
        return self.body(x)
'''


class MakesDirectoryWhenUnpickled:
    """A pickle payload: unpickling it calls os.makedirs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (str(self.path),)


@pytest.fixture(scope="module")
def recipe_checkpoint(tmp_path_factory):
    """The dict of a real checkpoint written by a one-epoch UNet run."""
    root = tmp_path_factory.mktemp("recipe")
    train(compose_config(*tiny(root / "data", root / "run", "unet"), *one_epoch()))
    return torch.load(root / "run" / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture
def scan(tmp_path):
    return write_scan(tmp_path / "scan.nii.gz", (16, 16, 16), np.eye(4))


def save(tmp_path, checkpoint, name="crafted.ckpt"):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def crafted(recipe_checkpoint, net):
    checkpoint = dict(recipe_checkpoint)
    checkpoint["hyper_parameters"] = {**recipe_checkpoint["hyper_parameters"], "net": net}
    return checkpoint


def run_predict(path, scan, tmp_path, *flags):
    """predict.py with --verbose: a refusal raises its exception (without it, one line and exit status 1)."""
    predict_script.main([str(path), str(scan), "--output", str(tmp_path / "out"), "--accelerator", "cpu", "--verbose",
                         *flags])


def test_a_real_checkpoint_predicts(tmp_path, recipe_checkpoint, scan):
    run_predict(save(tmp_path, recipe_checkpoint), scan, tmp_path)
    assert (tmp_path / "out" / "scan.nii.gz").is_file()


def test_arbitrary_target_at_the_top_of_net_is_refused(tmp_path, recipe_checkpoint, scan):
    victim = tmp_path / "created_by_checkpoint"
    path = save(tmp_path, crafted(recipe_checkpoint, {"_target_": "os.makedirs", "name": str(victim)}))
    with pytest.raises(CheckpointError, match=r"net\._target_ = 'os\.makedirs' is not an allowed target.*--trust-checkpoint"):
        run_predict(path, scan, tmp_path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        load_recipe_module(path)
    assert not victim.exists()
    # The payload is live: trusting the file runs it (and then fails, as a directory is no network).
    with pytest.raises(Exception):  # noqa: B017 - whatever the payload's constructor raises; the point is that it ran
        load_recipe_module(path, trust_checkpoint=True)
    assert victim.is_dir()


def test_arbitrary_target_nested_inside_net_is_refused(tmp_path, recipe_checkpoint, scan):
    victim = tmp_path / "created_by_nested_target"
    net = dict(recipe_checkpoint["hyper_parameters"]["net"])
    net["norm"] = ["adaptive", {"preset": {"_target_": "os.makedirs", "name": str(victim)}}]
    path = save(tmp_path, crafted(recipe_checkpoint, net))
    with pytest.raises(CheckpointError, match=r"net\.norm\[1\]\.preset\._target_ = 'os\.makedirs'"):
        run_predict(path, scan, tmp_path)
    assert not victim.exists()
    load_recipe_module(path, trust_checkpoint=True)  # the payload is live: trusted, it runs (preset becomes None)
    assert victim.is_dir()


def test_interpolations_are_refused(tmp_path, recipe_checkpoint):
    net = {**recipe_checkpoint["hyper_parameters"]["net"], "in_channels": "${oc.env:HOME}"}
    with pytest.raises(CheckpointError, match=r"net\.in_channels = '\$\{oc\.env:HOME\}' is an interpolation"):
        load_recipe_module(save(tmp_path, crafted(recipe_checkpoint, net)))


def test_module_class_outside_the_recipes_is_refused(tmp_path, recipe_checkpoint, scan, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Module: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("evil_plugin") is not None  # importable: only the table stops it
    checkpoint = {**recipe_checkpoint, CLASS_PATH_KEY: "evil_plugin.Module"}
    with pytest.raises(CheckpointError, match=r"adanorm_module_class = 'evil_plugin\.Module' is not one of adanorm's recipe modules"):
        run_predict(save(tmp_path, checkpoint), scan, tmp_path, "--trust-checkpoint")
    assert not marker.exists() and "evil_plugin" not in sys.modules


def test_pickled_object_is_refused(tmp_path, recipe_checkpoint, scan):
    victim = tmp_path / "created_by_unpickling"
    checkpoint = dict(recipe_checkpoint)
    checkpoint["hyper_parameters"] = {**recipe_checkpoint["hyper_parameters"], "lr": MakesDirectoryWhenUnpickled(victim)}
    path = save(tmp_path, checkpoint)
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects.*weights_only=True"):
        run_predict(path, scan, tmp_path, "--trust-checkpoint")
    assert not victim.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert victim.is_dir()


def test_trust_checkpoint_builds_a_custom_importable_network(tmp_path, recipe_checkpoint, scan, monkeypatch):
    (tmp_path / "custom_nets.py").write_text(CUSTOM_NETWORK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import custom_nets

    network = custom_nets.TinyNet(channels=4)
    checkpoint = crafted(recipe_checkpoint, {"_target_": "custom_nets.TinyNet", "channels": 4})
    checkpoint["state_dict"] = {f"net.{key}": value for key, value in network.state_dict().items()}
    path = save(tmp_path, checkpoint)
    with pytest.raises(CheckpointError, match=r"net\._target_ = 'custom_nets\.TinyNet' is not an allowed target"):
        run_predict(path, scan, tmp_path)
    run_predict(path, scan, tmp_path, "--trust-checkpoint")
    assert (tmp_path / "out" / "scan.nii.gz").is_file()
    module = load_recipe_module(path, trust_checkpoint=True)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(module.net.state_dict()[key], value, rtol=0, atol=0)


def test_weights_that_do_not_fit_the_network_give_a_short_error(tmp_path, recipe_checkpoint):
    net = {**recipe_checkpoint["hyper_parameters"]["net"], "channels": [8, 16, 32, 64]}
    with pytest.raises(CheckpointError) as error:
        load_recipe_module(save(tmp_path, crafted(recipe_checkpoint, net)))
    message = str(error.value)
    assert "do not fit the network it describes (monai.networks.nets.UNet)" in message
    assert "with another shape (file vs network)" in message and "(16, 1, 3, 3, 3) vs (8, 1, 3, 3, 3)" in message
    assert len(message) < 800, message


def test_checkpoints_naming_the_module_by_its_old_class_path_still_load(tmp_path, recipe_checkpoint):
    legacy = {**recipe_checkpoint, CLASS_PATH_KEY: "adanorm.recipes.module.SegmentationModule"}
    module = load_recipe_module(save(tmp_path, legacy))
    assert type(module).__name__ == "SegmentationModule"
    for key, value in recipe_checkpoint["state_dict"].items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
