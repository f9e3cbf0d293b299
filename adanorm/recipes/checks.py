"""Checks that stop a run before its first step, naming the file and the fix.

* :func:`check_volumes` reads every header: readable NIfTI, 3-D with the configured channels,
  and a label on its image's voxel grid.
* :func:`check_readable` reads every volume's voxel data through once: nibabel reads only the
  header when it opens a file, so a file cut short or damaged behind an intact header would
  otherwise fail only in the data loader, in the middle of training, without its name.
* :func:`check_labels` reads every label volume's voxels once: integer class indices in
  ``0..num_classes-1``, and across the data set exactly ``num_classes`` classes.

What the last two find per file is cached (keyed by resolved path, size and modification time),
so a second run reads no voxel data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from tqdm.auto import tqdm

from adanorm.recipes.layouts import SEGMENTATION, Record, VolumeDataError

AFFINE_TOLERANCE = 1e-3
LABEL_CACHE = "~/.cache/adanorm/label_checks.json"
"""Where :func:`check_readable` and :func:`check_labels` remember what they found per file (one JSON for every
data set, one section per check)."""
CACHE_VERSION = 2
MAX_LABEL_VALUES = 256
"""A label map with more distinct values than this is not a label map (an image in the label folder, say)."""
CHUNK = 1 << 22
"""Voxels summarised at a time, so a float label is never copied whole."""
READ_BLOCK = 1 << 24
"""Bytes of a volume read (decompressed) at a time by :func:`read_through`: memory stays flat for any volume size."""


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
        raise VolumeDataError(
            f"cannot read {path} ({error}); every volume must be a readable NIfTI (.nii or .nii.gz) file.") from error


def read_through(path: str) -> None:
    """Reads the volume's file to its end, through nibabel's opener (gzip included), and checks it holds all the
    voxel data its header describes; raises VolumeDataError naming the file otherwise."""
    voxels = _load_header(path).dataobj  # nibabel's ArrayProxy: where in the file the voxel data lies
    expected = voxels.offset + int(np.prod(voxels.shape)) * voxels.dtype.itemsize
    read = 0
    try:
        with ImageOpener(path) as stream:
            while block := stream.read(READ_BLOCK):
                read += len(block)
    except Exception as error:  # gzip raises EOFError, OSError or zlib.error; other openers their own types
        raise _damaged(path, f"reading it failed ({type(error).__name__}: {error})") from error
    if read < expected:
        raise _damaged(path, f"the file ends after {read} of the {expected} bytes its header describes")


def _damaged(path: str, detail: str) -> VolumeDataError:
    return VolumeDataError(f"{path} is truncated or damaged: {detail}. Copy or export it again (an interrupted copy "
                           f"or download leaves such files).")


def check_readable(paths: Sequence[str], cache: Optional[str] = LABEL_CACHE) -> None:
    """Stops the run, naming the file, unless every volume in ``paths`` can be read to its end (:func:`read_through`),
    reading each with a progress bar unless the cache knows it unchanged."""
    _per_file(paths, cache, "readable", read_through, "Reading volumes")


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


def _read_cache(cache: Optional[Path]) -> Dict[str, Dict[str, Any]]:
    """The cache's sections (check name -> resolved path -> {"file": _file_key, "result": ...})."""
    if cache is None or not cache.is_file():
        return {}
    try:
        content = json.loads(cache.read_text())
    except (OSError, ValueError):  # a damaged cache is only a slower run
        return {}
    if not isinstance(content, dict) or content.get("version") != CACHE_VERSION:
        return {}
    return {name: entries for name, entries in content.items() if isinstance(entries, dict)}


def _write_cache(cache: Path, sections: Dict[str, Dict[str, Any]]) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps({"version": CACHE_VERSION, **sections}))
        os.replace(staging, cache)  # atomic: parallel runs never read half a file
    except OSError:  # an unwritable cache is only a slower next run, and must not hide the check's own error
        return


def _per_file(paths: Sequence[str], cache: Optional[str], section: str, check: Callable[[str], Any],
              description: str) -> Dict[str, Any]:
    """``check(path)`` of every path, run with a progress bar unless the cache's ``section`` holds its result for
    the file unchanged. The results of the files checked are cached also when a later file raises."""
    cache_path = Path(cache).expanduser() if cache else None
    sections = _read_cache(cache_path)
    known = sections.setdefault(section, {})
    results: Dict[str, Any] = {}
    to_read: List[str] = []
    for path in dict.fromkeys(paths):
        entry = known.get(str(Path(path).resolve()))
        if entry is not None and entry["file"] == _file_key(path):
            results[path] = entry["result"]
        else:
            to_read.append(path)
    try:
        for path in tqdm(to_read, desc=description, unit="volume", disable=not to_read, leave=False):
            results[path] = check(path)
    finally:
        checked = [path for path in to_read if path in results]
        if cache_path is not None and checked:
            known.update({str(Path(path).resolve()): {"file": _file_key(path), "result": results[path]} for path in checked})
            _write_cache(cache_path, sections)
    return results


def label_summaries(paths: Sequence[str], cache: Optional[str] = LABEL_CACHE) -> Dict[str, Dict[str, Any]]:
    """:func:`summarize_label` of every path, read with a progress bar unless the cache already knows the file."""
    return _per_file(paths, cache, "labels", summarize_label, "Checking labels")


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
