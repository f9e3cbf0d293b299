"""predict.py: whole-volume predictions on the input's grid, and class probabilities for the classifier."""
import contextlib
import csv
import hashlib
import io
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from recipe_runs import predict_script, trained_checkpoint, write_scan

from adanorm.recipes.inference import OutputConflictError, atomic_output, planned_outputs, refuse_conflicts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tiny recipe runs: threads only add overhead


def test_segmentation_prediction_keeps_the_input_grid(tmp_path, capsys):
    checkpoint = trained_checkpoint(tmp_path, "unet")
    scans = tmp_path / "scans"
    scans.mkdir()
    oblique = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.3, 1.2, 3.0], [0.0, 0.0, 0.0, 1.0]])
    inputs = [write_scan(scans / "a.nii.gz", (30, 21, 17), oblique), write_scan(scans / "b.nii", (12, 40, 16), np.eye(4))]
    predict_script.main([str(checkpoint), str(scans), "--output", str(tmp_path / "out"), "--overlap", "0.5",
                         "--accelerator", "cpu"])
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
        predict_script.main([str(tmp_path / "model.ckpt"), str(tmp_path), "--verbose"])


def test_checkpoints_not_written_by_the_recipes_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    write_scan(tmp_path / "scan.nii.gz", (8, 8, 8), np.eye(4))
    with pytest.raises(ValueError, match="not written by an adanorm recipe"):
        predict_script.main([str(tmp_path / "other.ckpt"), str(tmp_path), "--verbose"])


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    """One trained segmentation checkpoint for the tests that only need some checkpoint."""
    torch.set_num_threads(1)
    return trained_checkpoint(tmp_path_factory.mktemp("checkpoint"), "unet")


def digests(folder):
    """Every path under ``folder`` with the SHA-256 of its content (None for folders): what a run may not change."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_scan(folder / "a.nii.gz", (20, 18, 16), np.eye(4))
    write_scan(folder / "b.nii", (16, 16, 16), np.eye(4))
    return folder


@pytest.mark.parametrize("output", ["same folder", "./-relative", "link to the folder", "the input file", "file link"])
def test_output_that_holds_or_is_an_input_is_refused_leaving_the_inputs_untouched(unet_checkpoint, scans, tmp_path,
                                                                                  monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    inputs = scans
    if output == "same folder":
        target = scans
    elif output == "./-relative":
        target = Path("./scans/../scans/")
    elif output == "link to the folder":
        target = tmp_path / "predictions"
        target.symlink_to(scans, target_is_directory=True)
    elif output == "the input file":
        inputs = target = scans / "a.nii.gz"
    else:  # an output name that is a link to the input: replacing it would lose the user's link into the scans
        inputs = scans / "a.nii.gz"
        target = tmp_path / "predictions"
        target.mkdir()
        (target / "a.nii.gz").symlink_to(inputs)
    before = digests(tmp_path)
    with pytest.raises(OutputConflictError, match=r"--output .*another folder") as refusal:
        predict_script.main([str(unet_checkpoint), str(inputs), "--output", str(target), "--overwrite", "--verbose"])
    assert str(scans / "a.nii.gz") in str(refusal.value), "the message names the input"
    assert digests(tmp_path) == before, "a refusal changes no file and leaves nothing behind"


def test_existing_output_is_refused_unless_overwrite_which_replaces_it_atomically(unet_checkpoint, scans, tmp_path,
                                                                                   capsys):
    output = tmp_path / "predictions"
    output.mkdir()
    (output / "b.nii").write_bytes(b"an earlier prediction")
    (output / "tile_report.csv").write_bytes(b"an earlier report")
    arguments = [str(unet_checkpoint), str(scans), "--output", str(output), "--tile-report", "--accelerator", "cpu"]
    before = digests(tmp_path)
    with pytest.raises(OutputConflictError, match=rf"{re.escape(str(output / 'b.nii'))} already exists \(and 1 more of "
                                                  r"the 3 outputs\); pass --overwrite"):
        predict_script.main(arguments + ["--verbose"])
    assert digests(tmp_path) == before, "nothing is written, a.nii.gz included, when one output exists"
    with pytest.raises(SystemExit):  # without --verbose: one line on stderr, no traceback
        predict_script.main(arguments)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f": error: {output / 'b.nii'} already exists (and 1 more of the 3 outputs); pass --overwrite "
                         f"to replace it, or --output <another folder>.")

    predict_script.main(arguments + ["--overwrite"])
    assert sorted(path.name for path in output.iterdir()) == ["a.nii.gz", "b.nii", "tile_report.csv"], \
        "no temporary file is left"
    for source in scans.iterdir():
        assert nib.load(output / source.name).shape == nib.load(source).shape
    assert (output / "tile_report.csv").read_text().startswith("image,mean_difference")
    assert {name: digest for name, digest in digests(tmp_path).items() if name.startswith("scans/")} == \
        {name: digest for name, digest in before.items() if name.startswith("scans/")}, "the inputs are unchanged"


def test_existing_probabilities_csv_is_refused(tmp_path):
    scan = write_scan(tmp_path / "x.nii.gz", (8, 8, 8), np.eye(4))
    output = tmp_path / "out"
    output.mkdir()
    (output / "probabilities.csv").write_text("image,predicted\n")
    planned = planned_outputs([scan], output, "classification", report_tiles=False)
    assert planned == [output / "probabilities.csv"]
    with pytest.raises(OutputConflictError, match=r"probabilities\.csv already exists; pass --overwrite"):
        refuse_conflicts([scan], output, planned, overwrite=False)
    refuse_conflicts([scan], output, planned, overwrite=True)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary_one(tmp_path, interruption):
    target = tmp_path / "scan.nii.gz"
    target.write_bytes(b"the previous prediction")
    with pytest.raises(interruption):
        with atomic_output(target) as temporary:
            assert temporary.parent == tmp_path and temporary.name.endswith(".nii.gz") and temporary.name.startswith(".")
            nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.uint8), np.eye(4)), temporary)
            raise interruption("half-way")
    assert [path.name for path in tmp_path.iterdir()] == ["scan.nii.gz"]
    assert target.read_bytes() == b"the previous prediction"

    with atomic_output(target) as temporary:
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), temporary)
    assert [path.name for path in tmp_path.iterdir()] == ["scan.nii.gz"]
    assert target.read_bytes()[:2] == b"\x1f\x8b", "gzip-compressed, as the name says"
    assert np.asanyarray(nib.load(target).dataobj).sum() == 64
