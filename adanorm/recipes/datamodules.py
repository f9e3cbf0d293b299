"""LightningDataModules for the recipes: a folder of NIfTI volumes, checked before training.

Synthetic, MNI152 and user data all take this one path; the generated data sets
(``adanorm.recipes.generators``) are written as such a folder first, so the default run exercises
exactly what a user's own volumes go through.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import lightning.pytorch as pl
from monai.data import CacheDataset, DataLoader
from torch.utils.data import ConcatDataset

from adanorm.recipes.checks import LABEL_CACHE, check_labels, check_readable, check_volumes
from adanorm.recipes.layouts import (
    CLASSIFICATION,
    LAYOUT_HINT,
    SEGMENTATION,
    TASKS,
    Record,
    VolumeDataError,
    pair_images_and_labels,
    read_dataset_json,
    read_label_csv,
)
from adanorm.recipes.transforms import volume_transforms


class NiftiFolder(pl.LightningDataModule):
    """A folder of NIfTI volumes (layouts: ``adanorm.recipes.layouts``), checked in ``setup``.

    Every volume, image and label, is read to its end once, so a truncated or damaged file stops the
    run before training, named. ``check_labels`` also checks every segmentation label's content and
    stops the run when a label is not an integer class map of ``num_classes`` classes. What both
    checks found per file is cached in ``label_cache`` (``None`` for no cache).
    """

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
        check_labels: bool = True,
        label_cache: Optional[str] = LABEL_CACHE,
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
        self.check_labels = check_labels
        self.label_cache = label_cache
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

    def check(self) -> Tuple[List[Record], List[Record]]:
        """The training and validation records, after every check that can stop a run before its first step."""
        training, validation = self.list_volumes()
        records = training + validation
        check_volumes(records, self.task, self.in_channels)
        files = ("image", "label") if self.task == SEGMENTATION else ("image",)  # classification labels are numbers
        check_readable([record[key] for record in records for key in files], self.label_cache)
        if self.task == SEGMENTATION and self.check_labels:
            check_labels(records, self.num_classes, self.label_cache)
        return training, validation

    def setup(self, stage: Optional[str] = None) -> None:
        training, validation = self.check()
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
