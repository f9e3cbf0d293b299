"""The folder layouts the recipes read, turned into lists of ``{"image": path, "label": ...}`` records.

``root`` is ``data.root``:

* segmentation: ``imagesTr/<case>.nii.gz`` + ``labelsTr/<case>.nii.gz`` paired by name (an
  image may carry nnU-Net's ``_0000`` suffix), or a Medical Segmentation Decathlon style
  ``dataset.json`` whose ``training`` (and optional ``validation``) lists name the files;
* classification: ``labels.csv`` with columns ``image`` (path relative to ``root``) and
  ``label`` (integer class index).

Every error here is a :class:`VolumeDataError` that names the file and the fix.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from monai.data import load_decathlon_datalist

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
TASKS = (SEGMENTATION, CLASSIFICATION)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_SUFFIX = "_0000"
Record = Dict[str, Any]
LAYOUT_HINT = (
    "expected imagesTr/<case>.nii.gz with labelsTr/<case>.nii.gz (image names may end in _0000), "
    "or a dataset.json with a 'training' list, or for classification a labels.csv with columns image,label."
)


class VolumeDataError(ValueError):
    """A data folder that cannot be trained on; raised before training starts."""


def case_name(path: Path) -> Optional[str]:
    """The file name without its NIfTI extension, or None for a file that is not NIfTI."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and not path.name.startswith("."):
            return path.name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> Dict[str, Path]:
    if not folder.is_dir():
        raise VolumeDataError(f"folder {folder} does not exist; {LAYOUT_HINT}")
    return {name: path for path in sorted(folder.iterdir()) if (name := case_name(path)) is not None}


def pair_images_and_labels(image_dir: Path, label_dir: Path) -> List[Record]:
    """Pairs ``image_dir/<case>[_0000].nii[.gz]`` with ``label_dir/<case>.nii[.gz]``; every file must pair."""
    images = {name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) else name: path
              for name, path in _nifti_files(image_dir).items()}
    labels = _nifti_files(label_dir)
    if not images:
        raise VolumeDataError(f"no NIfTI images (.nii or .nii.gz) in {image_dir}; {LAYOUT_HINT}")
    unpaired = [f"image {images[c]} has no label {label_dir / c}.nii.gz" for c in sorted(images.keys() - labels.keys())]
    unpaired += [f"label {labels[c]} has no image {image_dir / c}.nii.gz" for c in sorted(labels.keys() - images.keys())]
    if unpaired:
        raise VolumeDataError(
            "unpaired files: " + "; ".join(unpaired) + ". Name each label exactly like its image "
            "(an image may add the suffix _0000), or remove the extra file."
        )
    return [{"image": str(images[c]), "label": str(labels[c])} for c in sorted(images)]


def read_label_csv(csv_path: Path, num_classes: int) -> List[Record]:
    """Reads ``image,label`` rows; image paths are relative to the CSV's folder."""
    if not csv_path.is_file():
        raise VolumeDataError(f"classification needs {csv_path}; {LAYOUT_HINT}")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"image", "label"} <= set(reader.fieldnames or ()):
            raise VolumeDataError(f"{csv_path} has columns {reader.fieldnames}; it needs a header row 'image,label'.")
        records = []
        for line, row in enumerate(reader, start=2):
            label = row["label"].strip()
            if not label.isdigit() or int(label) >= num_classes:
                raise VolumeDataError(
                    f"{csv_path} line {line}: label {label!r} for {row['image']} is not a class index in "
                    f"0..{num_classes - 1}; use integer labels or set data.num_classes."
                )
            records.append({"image": str(csv_path.parent / row["image"].strip()), "label": int(label)})
    if not records:
        raise VolumeDataError(f"{csv_path} lists no volumes; add one 'image,label' row per volume.")
    return records


def read_dataset_json(path: Path, num_classes: int) -> Tuple[List[Record], List[Record]]:
    """The ``training`` and optional ``validation`` lists of a Decathlon-style dataset.json."""
    declared = json.loads(path.read_text()).get("labels")
    if declared is not None and len(declared) != num_classes:
        raise VolumeDataError(f"{path} declares {len(declared)} labels {declared} but data.num_classes={num_classes}; "
                              f"set data.num_classes={len(declared)}.")
    training = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training")
    try:
        validation = load_decathlon_datalist(path, is_segmentation=True, data_list_key="validation")
    except ValueError:  # MONAI raises when the key is absent: validation is then split off training
        validation = []
    return training, validation
