"""predict.py: whole-volume predictions on the input's grid, and class probabilities for the classifier."""
import contextlib
import csv
import importlib.util
import io
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from adanorm.recipes.run import train
from test_recipes import REPO, compose_config, one_epoch, tiny

spec = importlib.util.spec_from_file_location("predict_script", REPO / "predict.py")
predict_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(predict_script)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny recipe runs: threads only add overhead


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


def test_segmentation_prediction_keeps_the_input_grid(tmp_path, capsys):
    checkpoint = trained_checkpoint(tmp_path, "unet")
    scans = tmp_path / "scans"
    scans.mkdir()
    oblique = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.3, 1.2, 3.0], [0.0, 0.0, 0.0, 1.0]])
    inputs = [write_scan(scans / "a.nii.gz", (30, 21, 17), oblique), write_scan(scans / "b.nii", (12, 40, 16), np.eye(4))]
    predict_script.main([str(checkpoint), str(scans), "--output", str(tmp_path / "out"), "--overlap", "0.5", "--accelerator", "cpu"])
    for source in inputs:
        original, predicted = nib.load(source), nib.load(tmp_path / "out" / source.name)
        assert predicted.shape == original.shape
        np.testing.assert_allclose(predicted.affine, original.affine)
        assert predicted.header["descrip"] == original.header["descrip"]
        assert predicted.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(predicted.dataobj))) <= {0, 1}
    assert "predictions:" in capsys.readouterr().out


def test_classifier_prints_and_writes_class_probabilities(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "resnet")
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("x.nii.gz", "y.nii.gz"):
        write_scan(scans / name, (20, 20, 20), np.eye(4))
    console = io.StringIO()  # stdout and stderr (the progress bar) in the order a terminal shows them
    with warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        warnings.simplefilter("always")
        predict_script.main([str(checkpoint), str(scans), "--output", str(tmp_path / "out")])
    assert not [str(w.message) for w in caught if "LeafSpec" in str(w.message)], "Lightning's deprecation noise"
    printed = console.getvalue()
    assert "Predicting" in printed and "litlogger" not in printed
    pieces = re.split(r"[\r\n]", printed)
    rows = [piece for piece in pieces if "image=" in piece]
    assert len(rows) == 2 and all(row.startswith("image=") for row in rows), \
        f"a probability line shares a line with the progress bar: {rows}"
    assert "x.nii.gz" in rows[0]
    with open(tmp_path / "out" / "probabilities.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(row["image"]).name for row in rows] == ["x.nii.gz", "y.nii.gz"]
    for row in rows:
        probabilities = [float(row["p_0"]), float(row["p_1"])]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert int(row["predicted"]) == int(np.argmax(probabilities))


def test_inputs_that_are_not_nifti_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(FileNotFoundError, match="neither a .nii/.nii.gz file nor a folder"):
        predict_script.main([str(tmp_path / "model.ckpt"), str(tmp_path)])


def test_checkpoints_not_written_by_the_recipes_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    write_scan(tmp_path / "scan.nii.gz", (8, 8, 8), np.eye(4))
    with pytest.raises(ValueError, match="not written by an adanorm recipe"):
        predict_script.main([str(tmp_path / "other.ckpt"), str(tmp_path)])
