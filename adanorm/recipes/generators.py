"""Data sets the recipes write on first use as a NIfTI folder, then read like a user's own volumes."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence, Tuple

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


class SyntheticHardVolumes(GeneratedFolder):
    """A harder synthetic segmentation task whose norms differ (``data=synthetic_hard``; the study, issue #13).

    Background plus ``num_classes - 1`` kinds of blob (random ellipsoids; later ones overwrite earlier ones)
    told apart by intensity only, at low contrast, and each volume comes from its own "scanner":

    * class intensity spacing drawn per volume (``contrast`` times a factor in ``spacing_range``),
    * noise level drawn per volume (``noise`` times a factor in ``noise_range``),
    * a smooth multiplicative bias field (amplitude ``bias_field``, a few low-frequency waves),
    * a gamma curve (exponent in ``gamma_range``, after mapping intensities to [0, 1]),
    * a global scale and offset (``log_scale_range``, ``offset_range``).

    The recipe's percentile scaling removes the global scale and offset again (as it would between real
    scanners); the spacing, noise, gamma and bias field survive it, so absolute intensity is an unreliable
    cue and a network must read intensity relative to the rest of the patch or volume.
    """

    def __init__(self, root: str = "~/.cache/adanorm/synthetic_hard", num_volumes: int = 48, volume_size: int = 32,
                 num_objects: int = 10, radius_range: Sequence[float] = (2.0, 6.0), contrast: float = 0.5,
                 spacing_range: Sequence[float] = (0.6, 1.4), noise: float = 0.5, noise_range: Sequence[float] = (0.6, 1.5),
                 bias_field: float = 0.4, gamma_range: Sequence[float] = (0.6, 1.7),
                 log_scale_range: Sequence[float] = (-1.5, 1.5), offset_range: Sequence[float] = (-2.0, 2.0),
                 **kwargs: Any) -> None:
        kwargs.setdefault("num_classes", 3)
        super().__init__(root, **kwargs)
        if self.task != SEGMENTATION:
            raise VolumeDataError("data=synthetic_hard is a segmentation data set; "
                                  "use a segmentation model (unet, basic_unet, dynunet, segresnet).")
        if self.num_classes < 2:
            raise VolumeDataError(f"data.num_classes={self.num_classes}: synthetic_hard needs background plus at least one class.")
        self.num_volumes = num_volumes
        self.volume_size = volume_size
        self.num_objects = num_objects
        self.radius_range = tuple(float(r) for r in radius_range)
        self.contrast = contrast
        self.spacing_range = tuple(float(r) for r in spacing_range)
        self.noise = noise
        self.noise_range = tuple(float(r) for r in noise_range)
        self.bias_field = bias_field
        self.gamma_range = tuple(float(r) for r in gamma_range)
        self.log_scale_range = tuple(float(r) for r in log_scale_range)
        self.offset_range = tuple(float(r) for r in offset_range)

    def signature(self) -> str:
        settings = (self.num_volumes, self.volume_size, self.num_classes, self.num_objects, self.radius_range, self.contrast,
                    self.spacing_range, self.noise, self.noise_range, self.bias_field, self.gamma_range,
                    self.log_scale_range, self.offset_range)
        digest = hashlib.sha1(repr(settings).encode()).hexdigest()[:10]
        return f"hard-n{self.num_volumes}-size{self.volume_size}-c{self.num_classes}-{digest}-seed{self.seed}"

    def volume(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Image (float32) and label (uint8) of volume ``index``: a pure function of the settings, seed and index."""
        rng = np.random.RandomState(self.seed * 100_003 + index)
        size = self.volume_size
        grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * 3, indexing="ij"))
        label = np.zeros((size,) * 3, dtype=np.uint8)
        for _ in range(self.num_objects):
            radii = rng.uniform(*self.radius_range, size=3).astype(np.float32)
            centre = rng.uniform(radii.max(), size - radii.max(), size=3).astype(np.float32)
            inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
            label[inside] = rng.randint(1, self.num_classes)
        steps = self.contrast * rng.uniform(*self.spacing_range, size=self.num_classes - 1)
        means = np.concatenate([[0.0], np.cumsum(steps)])          # class order kept, spacing per scanner
        image = means[label] + rng.normal(0.0, self.noise * rng.uniform(*self.noise_range), size=label.shape)
        field = np.zeros(label.shape)
        for _ in range(3):                                           # smooth bias field: a few low-frequency waves
            frequency = rng.uniform(0.5, 1.5, size=3) * 2 * np.pi / size
            field += np.cos(np.tensordot(frequency, grid, axes=1) + rng.uniform(0, 2 * np.pi))
        image = image * np.exp(self.bias_field * field / 3)
        low, high = np.percentile(image, [0.5, 99.5])
        unit = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)
        image = unit ** np.exp(rng.uniform(*np.log(self.gamma_range)))   # nonlinear contrast per scanner
        image = image * np.exp(rng.uniform(*self.log_scale_range)) + rng.uniform(*self.offset_range)
        return image.astype(np.float32), label

    def generate(self, folder: Path) -> None:
        for index in range(self.num_volumes):
            image, label = self.volume(index)
            name = f"case_{index:03d}.nii.gz"
            nib.save(nib.Nifti1Image(label, np.eye(4)), _with_parent(folder / self.label_dir / name))
            nib.save(nib.Nifti1Image(image, np.eye(4)), _with_parent(folder / self.image_dir / name))


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
            raise VolumeDataError("data=mni152 is a tissue segmentation data set; "
                                  "use a segmentation model (unet, basic_unet, dynunet, segresnet).")
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
