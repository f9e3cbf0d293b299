"""LightningDataModules for the recipes.

Synthetic, MNI152 and user data all take one path: a folder of NIfTI files, checked before
training, then MONAI dictionary transforms. The generated data sets are written as such a folder
first, so the default run exercises exactly what a user's own volumes go through.

Folder layouts (``root`` is ``data.root``):

* segmentation: ``imagesTr/<case>.nii.gz`` + ``labelsTr/<case>.nii.gz`` paired by name (an
  image may carry nnU-Net's ``_0000`` suffix), or a Medical Segmentation Decathlon style
  ``dataset.json`` whose ``training`` (and optional ``validation``) lists name the files;
* classification: ``labels.csv`` with columns ``image`` (path relative to ``root``) and
  ``label`` (integer class index).
"""
from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
from monai.data import CacheDataset, DataLoader, load_decathlon_datalist
from monai.data.synthetic import create_test_image_3d
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    RandCropByPosNegLabeld,
    RandFlipd,
    Resized,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
)
from torch.utils.data import ConcatDataset

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
TASKS = (SEGMENTATION, CLASSIFICATION)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_SUFFIX = "_0000"
AFFINE_TOLERANCE = 1e-3
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
        raise VolumeDataError(f"{path} declares {len(declared)} labels {declared} but data.num_classes={num_classes}; set data.num_classes={len(declared)}.")
    training = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training")
    try:
        validation = load_decathlon_datalist(path, is_segmentation=True, data_list_key="validation")
    except ValueError:  # MONAI raises when the key is absent: validation is then split off training
        validation = []
    return training, validation


def check_volumes(records: Sequence[Record], task: str, in_channels: int) -> None:
    """Reads every header once so a broken file stops the run before training, naming the file."""
    for record in records:
        image = _load_header(record["image"])
        channels = image.shape[3] if len(image.shape) == 4 else 1
        if len(image.shape) not in (3, 4) or channels != in_channels:
            raise VolumeDataError(
                f"image {record['image']} has shape {image.shape}: the recipes need 3-D volumes with {in_channels} "
                f"channel(s) (D, H, W) or (D, H, W, C); set data.in_channels or re-export the file."
            )
        if task != SEGMENTATION:
            continue
        label = _load_header(record["label"])
        if tuple(label.shape[:3]) != tuple(image.shape[:3]):
            raise VolumeDataError(
                f"label {record['label']} has shape {label.shape} but image {record['image']} has {image.shape}; "
                f"resample the label onto the image grid."
            )
        if not np.allclose(label.affine, image.affine, atol=AFFINE_TOLERANCE):
            raise VolumeDataError(
                f"label {record['label']} and image {record['image']} have different affines "
                f"(label {label.affine.round(3).tolist()} vs image {image.affine.round(3).tolist()}); "
                f"they must share one voxel grid: resample the label onto the image."
            )


def _load_header(path: str) -> nib.spatialimages.SpatialImage:
    if not Path(path).is_file():
        raise VolumeDataError(f"{path} does not exist; fix the path in the file list or add the file.")
    try:
        return nib.load(path)
    except Exception as error:  # nibabel raises several unrelated types for damaged files
        raise VolumeDataError(f"cannot read {path} ({error}); every volume must be a readable NIfTI (.nii or .nii.gz) file.") from error


def volume_transforms(
    task: str, patch_size: Sequence[int], train: bool, samples_per_volume: int = 1, with_label: bool = True
) -> Compose:
    """The one preprocessing path, shared by training, validation and ``predict.py``.

    Percentile scaling instead of min-max so that one bright voxel does not squash an MRI.
    Classification resizes whole volumes to ``patch_size``; segmentation trains on patches
    (sampled half on foreground) and infers on whole volumes by sliding window.
    """
    keys = ["image", "label"] if task == SEGMENTATION and with_label else ["image"]
    steps: List[Any] = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True, channel_wise=True),
    ]
    if task == CLASSIFICATION:
        steps.append(Resized("image", spatial_size=patch_size))
    if train:
        if task == SEGMENTATION:
            steps += [
                SpatialPadd(keys, spatial_size=patch_size),
                RandCropByPosNegLabeld(keys, "label", spatial_size=patch_size, pos=1, neg=1, num_samples=samples_per_volume),
            ]
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    return Compose(steps)


class NiftiFolder(pl.LightningDataModule):
    """A folder of NIfTI volumes (see the module docstring for the layouts), checked in ``setup``."""

    def __init__(
        self,
        root: str,
        task: str = SEGMENTATION,
        patch_size: Sequence[int] = (32, 32, 32),
        batch_size: int = 2,
        samples_per_volume: int = 2,
        repeats: int = 1,
        val_fraction: float = 0.2,
        num_workers: int = 0,
        cache_rate: float = 1.0,
        in_channels: int = 1,
        num_classes: int = 2,
        image_dir: str = "imagesTr",
        label_dir: str = "labelsTr",
        labels_csv: str = "labels.csv",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task={task!r} is unknown; choose one of {TASKS}.")
        self.root = Path(root).expanduser()
        self.task = task
        self.patch_size = tuple(patch_size)
        self.batch_size = batch_size
        self.samples_per_volume = samples_per_volume
        self.repeats = repeats
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.cache_rate = cache_rate
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_dir = image_dir
        self.label_dir = label_dir
        self.labels_csv = labels_csv
        self.seed = seed

    @property
    def dataset_dir(self) -> Path:
        """Where the volumes are; generated data sets point this into their cache."""
        return self.root

    def list_volumes(self) -> Tuple[List[Record], List[Record]]:
        """Training and validation records; validation is split off when the folder names none."""
        folder = self.dataset_dir
        if not folder.is_dir():
            raise VolumeDataError(f"data.root={folder} is not a folder; {LAYOUT_HINT}")
        validation: List[Record] = []
        if self.task == CLASSIFICATION:
            training = read_label_csv(folder / self.labels_csv, self.num_classes)
        elif (folder / "dataset.json").is_file():
            training, validation = read_dataset_json(folder / "dataset.json", self.num_classes)
        else:
            training = pair_images_and_labels(folder / self.image_dir, folder / self.label_dir)
        if validation:
            return training, validation
        if len(training) < 2:
            raise VolumeDataError(f"{folder} holds {len(training)} volume(s); training needs at least 2 (one is held out for validation).")
        shuffled = random.Random(self.seed).sample(training, len(training))
        num_val = min(len(training) - 1, max(1, round(len(training) * self.val_fraction)))
        return shuffled[num_val:], shuffled[:num_val]

    def setup(self, stage: Optional[str] = None) -> None:
        training, validation = self.list_volumes()
        check_volumes(training + validation, self.task, self.in_channels)
        train_transforms = volume_transforms(self.task, self.patch_size, train=True, samples_per_volume=self.samples_per_volume)
        val_transforms = volume_transforms(self.task, self.patch_size, train=False)
        self.train_set = CacheDataset(training, train_transforms, cache_rate=self.cache_rate, progress=False)
        self.val_set = CacheDataset(validation, val_transforms, cache_rate=self.cache_rate, progress=False)

    def train_dataloader(self) -> DataLoader:
        # Repeats make an epoch several passes, so that a folder of few volumes does not validate after every step.
        passes = ConcatDataset([self.train_set] * self.repeats)
        return DataLoader(passes, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        # Batch 1: whole volumes differ in size, and it is what inference sees.
        return DataLoader(self.val_set, batch_size=1, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class GeneratedFolder(NiftiFolder):
    """A NiftiFolder written into ``root`` by ``generate`` on first use, then read like user data."""

    def signature(self) -> str:
        """Folder name under ``root``: changes whenever the generated content would."""
        raise NotImplementedError

    def generate(self, folder: Path) -> None:
        """Writes the data set into ``folder``, a staging folder renamed into place once complete."""
        raise NotImplementedError

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.signature()

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, so ranks do not write the same files.
        if self.dataset_dir.is_dir():
            return
        staging = self.dataset_dir.with_name(self.dataset_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.generate(staging)
        staging.rename(self.dataset_dir)


class SyntheticVolumes(GeneratedFolder):
    """Noisy spheres from ``monai.data.synthetic.create_test_image_3d``.

    Segmentation labels the spheres. Classification labels each volume by sphere size (few large
    vs. many small spheres): a shape property a 3D CNN must learn, not an intensity threshold.
    """

    def __init__(self, root: str = "~/.cache/adanorm/synthetic", num_volumes: int = 32, volume_size: int = 64,
                 noise: float = 0.6, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.num_volumes = num_volumes
        self.volume_size = volume_size
        self.noise = noise

    def signature(self) -> str:
        return f"{self.task}-n{self.num_volumes}-size{self.volume_size}-noise{self.noise}-seed{self.seed}"

    def generate(self, folder: Path) -> None:
        size = self.volume_size
        rows = []
        for index in range(self.num_volumes):
            rng = np.random.RandomState(self.seed * 100_003 + index)
            name = f"case_{index:03d}.nii.gz"
            if self.task == SEGMENTATION:
                image, label = create_test_image_3d(size, size, size, num_objs=12, rad_min=max(2, size // 16),
                                                    rad_max=max(3, size // 5), noise_max=self.noise, num_seg_classes=1,
                                                    random_state=rng)
                nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), _with_parent(folder / self.label_dir / name))
                nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), _with_parent(folder / self.image_dir / name))
            else:
                large = index % 2
                rad_min, rad_max = (size // 6, size // 4) if large else (max(1, size // 16), max(2, size // 10))
                image, _ = create_test_image_3d(size, size, size, num_objs=rng.randint(1, 4) if large else rng.randint(6, 12),
                                                rad_min=rad_min, rad_max=rad_max, noise_max=self.noise, num_seg_classes=1,
                                                random_state=rng)
                nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), _with_parent(folder / "images" / name))
                rows.append({"image": f"images/{name}", "label": large})
        if rows:
            with (folder / self.labels_csv).open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["image", "label"])
                writer.writeheader()
                writer.writerows(rows)


class MNI152Tissue(GeneratedFolder):
    """Background / grey matter / white matter segmentation on nilearn's packaged MNI152 2009 template.

    Real MRI with no download: nilearn ships the T1 and tissue probability maps in its wheel.
    The model trains on patches of the left hemisphere and is validated on the unseen right one.
    """

    CLASS_NAMES = ("background", "grey matter", "white matter")

    def __init__(self, root: str = "~/.cache/adanorm/mni152", resolution: int = 2, **kwargs: Any) -> None:
        kwargs.setdefault("num_classes", len(self.CLASS_NAMES))
        super().__init__(root, **kwargs)
        if self.task != SEGMENTATION:
            raise VolumeDataError("data=mni152 is a tissue segmentation data set; use a segmentation model (unet, basic_unet, dynunet, segresnet).")
        self.resolution = resolution

    def signature(self) -> str:
        return f"tissue-{self.resolution}mm"

    def generate(self, folder: Path) -> None:
        from nilearn import datasets  # optional dependency: only this data set needs it

        t1 = datasets.load_mni152_template(resolution=self.resolution)
        grey = datasets.load_mni152_gm_template(resolution=self.resolution).get_fdata()
        white = datasets.load_mni152_wm_template(resolution=self.resolution).get_fdata()
        tissue = np.argmax(np.stack([1.0 - grey - white, grey, white]), axis=0).astype(np.uint8)
        labels = nib.Nifti1Image(tissue, t1.affine)
        midline = int(round(np.linalg.solve(t1.affine, [0, 0, 0, 1])[0]))  # voxel index of x = 0 mm
        entries = {}
        for split, voxels in (("training", slice(None, midline)), ("validation", slice(midline, None))):
            name = f"mni152_{'left' if split == 'training' else 'right'}.nii.gz"
            nib.save(t1.slicer[voxels], _with_parent(folder / self.image_dir / name))
            nib.save(labels.slicer[voxels], _with_parent(folder / self.label_dir / name))
            entries[split] = [{"image": f"./{self.image_dir}/{name}", "label": f"./{self.label_dir}/{name}"}]
        description = {"name": "MNI152 2009 tissue", "labels": dict(enumerate(self.CLASS_NAMES)), **entries}
        (folder / "dataset.json").write_text(json.dumps(description, indent=2))


def _with_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
