"""Checks that stop a run before its first step, naming the file and the fix.

* :func:`check_volumes` reads every header: readable NIfTI, 3-D with the configured channels,
  and a label on its image's voxel grid.
* :func:`check_labels` reads every label volume's voxels once: integer class indices in
  ``0..num_classes-1``, and across the data set exactly ``num_classes`` classes. What it finds
  per file is cached (keyed by path, size and modification time), so a second run reads no
  label data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from adanorm.recipes.layouts import SEGMENTATION, Record, VolumeDataError

AFFINE_TOLERANCE = 1e-3
LABEL_CACHE = "~/.cache/adanorm/label_checks.json"
"""Where :func:`check_labels` remembers what each label file holds (one JSON for every data set)."""
LABEL_CACHE_VERSION = 1
MAX_LABEL_VALUES = 256
"""A label map with more distinct values than this is not a label map (an image in the label folder, say)."""
CHUNK = 1 << 22
"""Voxels summarised at a time, so a float label is never copied whole."""


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


def summarize_label(path: str) -> Dict[str, Any]:
    """What one label volume holds: its distinct values (at most MAX_LABEL_VALUES + 1 of them, sorted) and,
    if it has one, a value that is not an integer."""
    data = np.asanyarray(_load_header(path).dataobj)
    if data.dtype.kind not in "biuf":
        return {"values": [], "non_integer": f"values of type {data.dtype}"}
    values: set = set()
    flat = data.ravel(order="K")  # a view in memory order: nibabel arrays are often Fortran-ordered
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start:start + CHUNK]
        if chunk.dtype.kind == "f":
            bad = ~np.isfinite(chunk) | (chunk != np.floor(chunk))
            if bad.any():
                return {"values": [], "non_integer": float(chunk[bad][0])}
            chunk = chunk.astype(np.int64)
        low, high = int(chunk.min()), int(chunk.max())
        if low >= 0 and high < 1 << 16:
            values.update(np.flatnonzero(np.bincount(chunk.astype(np.intp, copy=False))).tolist())
        else:
            values.update(np.unique(chunk).tolist())
        if len(values) > MAX_LABEL_VALUES:
            break
    return {"values": sorted(values)[: MAX_LABEL_VALUES + 1], "non_integer": None}


def _file_key(path: str) -> Dict[str, Any]:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_cache(cache: Optional[Path]) -> Dict[str, Any]:
    if cache is None or not cache.is_file():
        return {}
    try:
        content = json.loads(cache.read_text())
    except (OSError, ValueError):  # a damaged cache is only a slower run
        return {}
    return content.get("files", {}) if content.get("version") == LABEL_CACHE_VERSION else {}


def _write_cache(cache: Path, files: Dict[str, Any]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps({"version": LABEL_CACHE_VERSION, "files": files}))
    os.replace(staging, cache)  # atomic: parallel runs never read half a file


def label_summaries(paths: Sequence[str], cache: Optional[str] = LABEL_CACHE) -> Dict[str, Dict[str, Any]]:
    """:func:`summarize_label` of every path, read with a progress bar unless the cache already knows the file."""
    cache_path = Path(cache).expanduser() if cache else None
    known = _read_cache(cache_path)
    summaries: Dict[str, Dict[str, Any]] = {}
    to_read: List[str] = []
    for path in dict.fromkeys(paths):
        entry = known.get(str(Path(path).resolve()))
        if entry is not None and entry["file"] == _file_key(path):
            summaries[path] = entry["summary"]
        else:
            to_read.append(path)
    for path in tqdm(to_read, desc="Checking labels", unit="volume", disable=not to_read, leave=False):
        summaries[path] = summarize_label(path)
    if cache_path is not None and to_read:
        known.update({str(Path(p).resolve()): {"file": _file_key(p), "summary": summaries[p]} for p in to_read})
        _write_cache(cache_path, known)
    return summaries


def check_labels(records: Sequence[Record], num_classes: int, cache: Optional[str] = LABEL_CACHE) -> List[int]:
    """Stops the run, naming the file, unless every label holds integer classes ``0..num_classes-1`` and the data
    set as a whole holds ``num_classes`` classes. Returns the classes found."""
    summaries = label_summaries([record["label"] for record in records], cache)
    skip_hint = "(data.check_labels=false skips this check)"
    for path, summary in summaries.items():
        if summary["non_integer"] is not None:
            raise VolumeDataError(
                f"label {path} holds {summary['non_integer']}, which is not a class index: labels must hold integer "
                f"classes 0..{num_classes - 1}. If the label was resampled, resample it again with nearest-neighbour "
                f"interpolation."
            )
        if len(summary["values"]) > MAX_LABEL_VALUES:
            raise VolumeDataError(
                f"label {path} holds more than {MAX_LABEL_VALUES} distinct values: it is not a label map "
                f"(is it an image?). Labels hold one integer class per voxel, 0..{num_classes - 1}."
            )
        if summary["values"] and summary["values"][0] < 0:
            raise VolumeDataError(
                f"label {path} holds {summary['values'][0]}, which is not a class index: labels must hold integer "
                f"classes 0..{num_classes - 1}; remap the value."
            )
    found = sorted(set().union(*(summary["values"] for summary in summaries.values())))
    holding = {value: next(path for path, s in summaries.items() if value in s["values"]) for value in found}
    contiguous = found == list(range(len(found)))
    outside = [value for value in found if value >= num_classes]
    if outside and contiguous:
        raise VolumeDataError(
            f"the {len(summaries)} label volumes hold {len(found)} classes {found} but data.num_classes={num_classes}; "
            f"{holding[outside[0]]} holds class {outside[0]}. Set data.num_classes={len(found)} (background included)."
        )
    if outside:
        raise VolumeDataError(
            f"label {holding[outside[0]]} holds {outside[0]}, outside the classes 0..{num_classes - 1} of "
            f"data.num_classes={num_classes} (the labels hold {found}). Labels must hold class indices: remap the "
            f"values to 0..{len(found) - 1} and set data.num_classes={len(found)}."
        )
    if len(found) != num_classes:
        missing = ", ".join(map(str, sorted(set(range(num_classes)) - set(found))))
        fix = f"Set data.num_classes={len(found)}" if contiguous else \
            f"Renumber the classes 0..{len(found) - 1} and set data.num_classes={len(found)}"
        raise VolumeDataError(
            f"the {len(summaries)} label volumes hold {len(found)} classes {found} but data.num_classes={num_classes}: "
            f"no label holds class {missing}. {fix}, or add volumes that hold class {missing} {skip_hint}."
        )
    return found
