"""The recipes' data, one module per concern; this module re-exports them under their earlier import path.

* ``adanorm.recipes.layouts`` — the folder layouts (imagesTr/labelsTr, dataset.json, labels.csv) as records;
* ``adanorm.recipes.checks`` — the header and label checks that stop a run before training, naming the file;
* ``adanorm.recipes.transforms`` — the one MONAI preprocessing path (training, validation, ``predict.py``);
* ``adanorm.recipes.datamodules`` — ``NiftiFolder`` (your own volumes) and ``GeneratedFolder``;
* ``adanorm.recipes.generators`` — ``SyntheticVolumes`` and ``MNI152Tissue``, written as NIfTI folders on first use.
"""
from adanorm.recipes.checks import AFFINE_TOLERANCE, LABEL_CACHE, check_labels, check_volumes, summarize_label
from adanorm.recipes.datamodules import GeneratedFolder, NiftiFolder
from adanorm.recipes.generators import MNI152Tissue, SyntheticVolumes
from adanorm.recipes.layouts import (
    CHANNEL_SUFFIX,
    CLASSIFICATION,
    LAYOUT_HINT,
    NIFTI_SUFFIXES,
    SEGMENTATION,
    TASKS,
    Record,
    VolumeDataError,
    case_name,
    pair_images_and_labels,
    read_dataset_json,
    read_label_csv,
)
from adanorm.recipes.transforms import volume_transforms

__all__ = [
    "AFFINE_TOLERANCE", "LABEL_CACHE", "check_labels", "check_volumes", "summarize_label",
    "GeneratedFolder", "NiftiFolder", "MNI152Tissue", "SyntheticVolumes",
    "CHANNEL_SUFFIX", "CLASSIFICATION", "LAYOUT_HINT", "NIFTI_SUFFIXES", "SEGMENTATION", "TASKS", "Record",
    "VolumeDataError", "case_name", "pair_images_and_labels", "read_dataset_json", "read_label_csv",
    "volume_transforms",
]
