"""Data sets the recipes write on first use as a NIfTI folder, then read like a user's own volumes."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_3d

from adanorm.recipes.datamodules import GeneratedFolder
from adanorm.recipes.layouts import SEGMENTATION, VolumeDataError


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
