"""NiftiFolder: the layouts it reads, and the errors that stop a run before training, naming the file."""
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.openers import ImageOpener

from adanorm.recipes import checks
from adanorm.recipes import data as data_module
from adanorm.recipes.data import MNI152Tissue, NiftiFolder, VolumeDataError

pytestmark = pytest.mark.slow  # recipe runs, subprocesses or builds: the full suite's part

SHAPE = (12, 12, 12)


def write_volume(path, shape=SHAPE, affine=None, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.RandomState(0).rand(*shape).astype(dtype)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def write_pair(root, case, image_suffix="", label_shape=SHAPE, label_affine=None):
    write_volume(root / "imagesTr" / f"{case}{image_suffix}.nii.gz")
    label = root / "labelsTr" / f"{case}.nii.gz"
    label.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(label_shape, np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4) if label_affine is None else label_affine), label)


def folder(root, **kwargs):
    kwargs.setdefault("patch_size", (8, 8, 8))
    kwargs.setdefault("label_cache", None)
    return NiftiFolder(str(root), **kwargs)


def write_label(root, case, values, dtype=np.uint8):
    """Overwrites ``case``'s label: background with ``values`` written into its first voxels."""
    mask = np.zeros(SHAPE, dtype)
    mask.flat[: len(values)] = values
    nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "labelsTr" / f"{case}.nii.gz")


def test_pairs_by_name_accepting_nnunet_channel_suffix(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b", image_suffix="_0000")
    (tmp_path / "imagesTr" / "._a.nii.gz").write_bytes(b"macOS resource fork")  # hidden files are not volumes
    training, validation = folder(tmp_path).list_volumes()
    records = sorted(training + validation, key=lambda r: r["image"])
    assert [r["image"].rsplit("/", 1)[1] for r in records] == ["a.nii.gz", "b_0000.nii.gz"]
    assert [r["label"].rsplit("/", 1)[1] for r in records] == ["a.nii.gz", "b.nii.gz"]
    assert len(validation) == 1


def test_setup_loads_patches_for_training_and_whole_volumes_for_validation(tmp_path):
    for case in "abc":
        write_pair(tmp_path, case)
    data = folder(tmp_path, batch_size=2, samples_per_volume=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 1, 8, 8, 8) and batch["label"].shape == (4, 1, 8, 8, 8)
    assert next(iter(data.val_dataloader()))["image"].shape == (1, 1, *SHAPE)
    data.repeats = 3  # few volumes: several passes per epoch
    assert len(data.train_dataloader()) == 3 * len(data.train_set) // 2


@pytest.mark.parametrize("extra, named", [("image", "imagesTr/c.nii.gz"), ("label", "labelsTr/c.nii.gz")])
def test_unpaired_file_is_named(tmp_path, extra, named):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b")
    write_volume(tmp_path / ("imagesTr" if extra == "image" else "labelsTr") / "c.nii.gz")
    with pytest.raises(VolumeDataError, match=f"unpaired.*{named}.*Name each label exactly like its image"):
        folder(tmp_path).setup()


def test_unreadable_file_is_named(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b")
    (tmp_path / "labelsTr" / "b.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(VolumeDataError, match=r"cannot read .*labelsTr/b\.nii\.gz.*readable NIfTI"):
        folder(tmp_path).setup()


def test_shape_mismatch_is_named(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b", label_shape=(12, 12, 10))
    with pytest.raises(VolumeDataError, match=r"label .*labelsTr/b\.nii\.gz has shape \(12, 12, 10\).*resample"):
        folder(tmp_path).setup()


def test_affine_mismatch_is_named(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b", label_affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(VolumeDataError, match=r"labelsTr/b\.nii\.gz and image .*different affines"):
        folder(tmp_path).setup()


def test_wrong_dimensionality_and_channels_are_named(tmp_path):
    write_pair(tmp_path, "a")
    write_volume(tmp_path / "imagesTr" / "b.nii.gz", shape=(12, 12, 12, 2))
    write_volume(tmp_path / "labelsTr" / "b.nii.gz")
    with pytest.raises(VolumeDataError, match=r"imagesTr/b\.nii\.gz has shape \(12, 12, 12, 2\).*data.in_channels"):
        folder(tmp_path).setup()


def test_missing_or_empty_folder_explains_the_layout(tmp_path):
    with pytest.raises(VolumeDataError, match="not a folder.*imagesTr"):
        folder(tmp_path / "nowhere").setup()
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(VolumeDataError, match="no NIfTI images"):
        folder(tmp_path).setup()


def test_decathlon_dataset_json_with_explicit_validation(tmp_path):
    for case in "abc":
        write_pair(tmp_path, case)
    entry = {case: {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"} for case in "abc"}
    description = {"labels": {"0": "background", "1": "tumour"}, "training": [entry["a"], entry["b"]], "validation": [entry["c"]]}
    (tmp_path / "dataset.json").write_text(json.dumps(description))
    training, validation = folder(tmp_path).list_volumes()
    assert [r["image"] for r in validation] == [str(tmp_path / "imagesTr" / "c.nii.gz")]
    assert len(training) == 2
    with pytest.raises(VolumeDataError, match="declares 2 labels.*data.num_classes=3"):
        folder(tmp_path, num_classes=3).list_volumes()


def test_dataset_json_pointing_at_a_missing_file_is_named(tmp_path):
    write_pair(tmp_path, "a")
    entries = [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
               {"image": "./imagesTr/gone.nii.gz", "label": "./labelsTr/a.nii.gz"}]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": entries}))
    with pytest.raises(VolumeDataError, match=r"imagesTr/gone\.nii\.gz does not exist"):
        folder(tmp_path).setup()


def test_classification_reads_labels_csv(tmp_path):
    for case in "abcd":
        write_volume(tmp_path / "scans" / f"{case}.nii.gz")
    (tmp_path / "labels.csv").write_text("image,label\n" + "".join(f"scans/{c}.nii.gz,{i % 2}\n" for i, c in enumerate("abcd")))
    data = folder(tmp_path, task="classification", val_fraction=0.25)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape[1:] == (1, 8, 8, 8) and batch["label"].dtype == torch.int64


@pytest.mark.parametrize("csv_text, message", [
    ("image,label\na.nii.gz,0\nmissing.nii.gz,1\n", r"missing\.nii\.gz does not exist"),
    ("image,label\na.nii.gz,0\na.nii.gz,tumour\n", r"line 3: label 'tumour'.*data.num_classes"),
    ("image,label\na.nii.gz,0\na.nii.gz,2\n", r"line 3: label '2'.*0\.\.1"),
    ("path,class\na.nii.gz,0\n", r"needs a header row 'image,label'"),
])
def test_classification_csv_errors_are_named(tmp_path, csv_text, message):
    write_volume(tmp_path / "a.nii.gz")
    (tmp_path / "labels.csv").write_text(csv_text)
    with pytest.raises(VolumeDataError, match=message):
        folder(tmp_path, task="classification").setup()


def test_mni152_tissue_folder_is_built_from_the_packaged_template(tmp_path):
    pytest.importorskip("nilearn")
    data = MNI152Tissue(str(tmp_path), patch_size=(16, 16, 16))
    data.prepare_data()
    training, validation = data.list_volumes()
    left, right = nib.load(training[0]["image"]), nib.load(validation[0]["image"])
    assert left.affine[0, 3] < 0 <= right.affine[0, 3], "trains on the left hemisphere, validates on the right"
    labels = np.asanyarray(nib.load(training[0]["label"]).dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert json.loads((data.dataset_dir / "dataset.json").read_text())["labels"]["2"] == "white matter"


def test_data_modules_keep_their_earlier_import_path():
    from adanorm.recipes import datamodules, generators, layouts, transforms

    assert data_module.NiftiFolder is datamodules.NiftiFolder and data_module.SyntheticVolumes is generators.SyntheticVolumes
    assert data_module.case_name is layouts.case_name and data_module.volume_transforms is transforms.volume_transforms
    assert data_module.CLASSIFICATION == "classification"  # what inference.py imports


@pytest.mark.parametrize("values, dtype, num_classes, message", [
    ([1, 0.5], np.float32, 2, r"label .*labelsTr/b\.nii\.gz holds 0\.5, which is not a class index.*nearest-neighbour"),
    ([1, -1], np.int16, 2, r"label .*labelsTr/b\.nii\.gz holds -1, which is not a class index"),
    ([1, 255], np.uint8, 2, r"label .*labelsTr/b\.nii\.gz holds 255, outside the classes 0\.\.1.*remap"),
    ([1, 2], np.uint8, 2, r"hold 3 classes \[0, 1, 2\] but data\.num_classes=2; .*labelsTr/b\.nii\.gz holds class 2\. "
                          r"Set data\.num_classes=3"),
    ([1], np.uint8, 3, r"hold 2 classes \[0, 1\] but data\.num_classes=3: no label holds class 2"),
    (list(range(300)), np.int16, 2, r"label .*labelsTr/b\.nii\.gz holds more than 256 distinct values.*not a label map"),
])
def test_bad_labels_are_named_before_training(tmp_path, values, dtype, num_classes, message):
    for case in "abc":
        write_pair(tmp_path, case)
    write_label(tmp_path, "b", values, dtype)
    with pytest.raises(VolumeDataError, match=message):
        folder(tmp_path, num_classes=num_classes).setup()
    folder(tmp_path, num_classes=num_classes, check_labels=False).check()  # the way around it, named in the errors


def test_float_labels_holding_integers_pass(tmp_path):
    for case in "ab":
        write_pair(tmp_path, case)
        write_label(tmp_path, case, [1.0, 1.0], np.float32)
    training, validation = folder(tmp_path).check()
    assert len(training + validation) == 2


@pytest.fixture
def voxel_reads(monkeypatch):
    """Counts every read of voxel data through nibabel (headers are not counted)."""
    reads = []
    original = nib.arrayproxy.ArrayProxy.__array__

    def counting(self, *args, **kwargs):
        reads.append(self.file_like)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", counting)
    return reads


def test_label_checks_are_cached_so_a_second_run_reads_no_label_data(tmp_path, voxel_reads):
    for case in "abc":
        write_pair(tmp_path, case)
    cache = tmp_path / "cache" / "label_checks.json"
    assert folder(tmp_path, label_cache=str(cache)).check()
    assert sorted(os.path.basename(path) for path in voxel_reads) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert cache.is_file()

    voxel_reads.clear()
    assert folder(tmp_path, label_cache=str(cache)).check()
    assert voxel_reads == [], "the second run reads no label data"

    write_label(tmp_path, "b", [1, 0.5], np.float32)  # a changed file (size, mtime) is read again, and only it
    with pytest.raises(VolumeDataError, match=r"labelsTr/b\.nii\.gz holds 0\.5"):
        folder(tmp_path, label_cache=str(cache)).check()
    assert [os.path.basename(path) for path in voxel_reads] == ["b.nii.gz"]
    voxel_reads.clear()
    with pytest.raises(VolumeDataError, match=r"labelsTr/b\.nii\.gz holds 0\.5"):  # a bad result is cached too
        folder(tmp_path, label_cache=str(cache)).check()
    assert voxel_reads == []


def test_label_summary_reads_large_labels_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "CHUNK", 100)  # 12^3 voxels: 18 chunks
    mask = np.zeros(SHAPE, np.uint8)
    mask[-1, -1, -1] = 1  # in the last chunk only
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(mask, np.eye(4)), path)
    assert checks.summarize_label(str(path)) == {"values": [0, 1], "non_integer": None}


def cut_in_half(path):
    """Keeps the first half of the file's bytes: the header (at the start, gzip included) stays readable."""
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def cut_the_end(path):
    """Drops the file's last 16 bytes (gzip's checksum and length, and some data): for files too small to halve."""
    path.write_bytes(path.read_bytes()[:-16])


def scramble_middle(path):
    """Overwrites bytes in the middle of the (compressed) data: the file keeps its length and its header."""
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 64] = bytes(range(64))
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("damage, damaged_file, check_labels", [
    (cut_in_half, "imagesTr/b.nii.gz", True),
    (cut_in_half, "imagesTr/b.nii", True),
    (scramble_middle, "imagesTr/b.nii.gz", True),
    (cut_the_end, "labelsTr/b.nii.gz", False),  # labels are read through even when their content is not checked
])
def test_a_truncated_or_damaged_volume_is_named_before_training(tmp_path, damage, damaged_file, check_labels):
    for case in "abc":
        write_pair(tmp_path, case)
    damaged = tmp_path / damaged_file
    if damaged.name == "b.nii":  # an uncompressed image in place of the compressed one
        nib.save(nib.load(tmp_path / "imagesTr" / "b.nii.gz"), damaged)
        (tmp_path / "imagesTr" / "b.nii.gz").unlink()
    damage(damaged)
    nib.load(damaged)  # the header still reads: only reading the voxels finds the damage
    with pytest.raises(VolumeDataError, match=rf"{re.escape(str(damaged))} is truncated or damaged: .*"
                                              r"Copy or export it again"):
        folder(tmp_path, check_labels=check_labels).setup()


def test_volumes_read_through_once_are_cached_so_a_second_run_reads_no_voxel_data(tmp_path, monkeypatch, voxel_reads):
    opened = []

    class CountingOpener(ImageOpener):
        def __init__(self, path, *args, **kwargs):
            opened.append(os.path.relpath(path, tmp_path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(checks, "ImageOpener", CountingOpener)
    for case in "abc":
        write_pair(tmp_path, case)
    cache = tmp_path / "cache" / "checks.json"
    folder(tmp_path, label_cache=str(cache)).check()
    assert sorted(opened) == [f"{kind}/{case}.nii.gz" for kind in ("imagesTr", "labelsTr") for case in "abc"]

    opened.clear()
    voxel_reads.clear()
    folder(tmp_path, label_cache=str(cache)).check()
    assert opened == [] and voxel_reads == [], "the second run reads no voxel data"

    write_volume(tmp_path / "imagesTr" / "b.nii.gz")  # rewritten (new mtime): read again, and only it
    os.utime(tmp_path / "imagesTr" / "b.nii.gz", ns=(1, 1))
    folder(tmp_path, label_cache=str(cache)).check()
    assert opened == ["imagesTr/b.nii.gz"]

    cut_in_half(tmp_path / "imagesTr" / "c.nii.gz")
    with pytest.raises(VolumeDataError, match=r"imagesTr/c\.nii\.gz is truncated"):
        folder(tmp_path, label_cache=str(cache)).check()
