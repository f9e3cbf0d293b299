"""The one preprocessing path (MONAI dictionary transforms), shared by training, validation and ``predict.py``."""
from __future__ import annotations

from typing import Any, List, Sequence

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

from adanorm.recipes.layouts import CLASSIFICATION, SEGMENTATION


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
