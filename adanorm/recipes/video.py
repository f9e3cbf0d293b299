"""Video clips for the recipes: MP4 files read and written through PyAV, a folder of clips with a labels CSV
(``data=video_folder``), and moving digits made from real handwriting (``data=moving_digits``).

A folder of clips::

    /data/my_clips/
    ├── labels.csv        ← file,label[,split]: a path relative to the folder, a class index, optionally train/val
    ├── walk_001.mp4
    └── ...

Every clip is decoded once before training (``VideoFolder.setup``): a listed file that is missing, a file that
does not decode, or a label outside ``0..num_classes-1`` stops the run with one line naming the file and the fix.
Clips are grayscale (``in_channels=1``) or RGB (``in_channels=3``), resampled to ``patch_size`` (frames, height,
width): frames picked evenly over the clip, each frame resized bilinearly, intensities scaled to [0, 1].
``MovingDigits`` writes such a folder of MP4 files on first use and reads it back like a user's own.
"""
from __future__ import annotations

import csv
import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from adanorm.recipes.layouts import CLASSIFICATION, Record, VolumeDataError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")
FILE_COLUMN, LABEL_COLUMN, SPLIT_COLUMN = "file", "label", "split"
SPLITS = ("train", "val")
VIDEO_INPUTS = "video"
"""``RecipeModule``'s checkpoint key ``adanorm_inputs`` holds ``{"format": VIDEO_INPUTS, "in_channels": C}`` for a
model trained on clips, so that ``adanorm-predict`` reads clips for it (``adanorm.recipes.inference``)."""
ENCODERS = ("libx264", "mpeg4")  # PyAV's wheels ship both; libx264 at a low crf keeps digits sharp
FOLDER_HINT = "expected a folder holding labels.csv (columns file,label and optionally split: train or val) and the clips it lists."


class VideoDataError(VolumeDataError):
    """A video folder or clip that cannot be trained on or predicted; the message names the file and the fix."""


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES and not path.name.startswith(".")


def video_inputs(paths: Sequence[Path]) -> List[Path]:
    """The clips ``paths`` name: each a video file, or a folder whose video files (directly inside) are all taken."""
    files: List[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file() and is_video(path):
            found = [path]
        elif path.is_dir():
            found = [child for child in sorted(path.iterdir()) if child.is_file() and is_video(child)]
        else:
            found = []
        if not found:
            raise VideoDataError(f"{path} is neither a video file ({', '.join(VIDEO_SUFFIXES)}) nor a folder holding some; "
                                 f"pass clips or folders of them.")
        files += [file for file in found if file not in files]
    return files


def _encoder() -> str:
    import av

    for name in ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises its own errors for an encoder its FFmpeg lacks
            continue
    raise RuntimeError(f"PyAV's FFmpeg has none of the encoders {ENCODERS}; reinstall av from its wheel (pip install av).")


def write_video(path: Path, frames: np.ndarray, fps: int = 8, crf: int = 10) -> Path:
    """Writes ``frames`` (uint8, T×H×W or T×H×W×1 grayscale, or T×H×W×3 RGB; H and W even) as an MP4 file at ``path``.

    H.264 (libx264, ``crf`` 0–51: lower is closer to the frames; 10 is visually lossless) in yuv420p, which every
    player decodes; MPEG-4 part 2 where PyAV's FFmpeg has no libx264. The file is written under a hidden temporary
    name beside ``path`` and renamed into place, so ``path`` is the old file or the complete new one.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] != 3):
        raise ValueError(f"frames must be uint8 T×H×W or T×H×W×3, got {frames.dtype} {frames.shape}.")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frames are {height}×{width}: yuv420p video needs an even height and width.")
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    codec = _encoder()
    try:
        with av.open(str(temporary), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.thread_count = 1  # one thread: the same bytes on every machine
            stream.options = {"crf": str(crf)} if codec == "libx264" else {"qscale": "1"}
            pixel_format = "gray" if frames.ndim == 3 else "rgb24"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=pixel_format)))
            container.mux(stream.encode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def read_video(path: Path, in_channels: int = 1) -> np.ndarray:
    """Every frame of the clip at ``path`` as uint8 (T, H, W, C), C = ``in_channels`` (1: gray, 3: RGB)."""
    import av
    from av.video.reformatter import VideoReformatter

    if in_channels not in (1, 3):
        raise VideoDataError(f"data.in_channels={in_channels}: video clips are read as grayscale (1) or RGB (3).")
    pixel_format = "gray" if in_channels == 1 else "rgb24"
    reformatter = VideoReformatter()  # one per clip: a new one per frame costs more than decoding
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDataError(f"{path} holds no video stream; pass a video file (MP4 and the like).")
            frames = [reformatter.reformat(frame, format=pixel_format).to_ndarray()
                      for frame in container.decode(container.streams.video[0])]
    except av.error.FFmpegError as error:
        if isinstance(error, av.error.FileNotFoundError):
            raise FileNotFoundError(2, "no such file", str(path)) from None
        raise VideoDataError(f"{path} cannot be decoded as a video ({error.strerror or type(error).__name__}): it is damaged, "
                             f"truncated or not a video; re-export it (e.g. ffmpeg -i in -c:v libx264 out.mp4) or remove it.") from None
    if not frames:
        raise VideoDataError(f"{path} decodes to no frames; re-export it or remove it.")
    clip = np.stack(frames)
    return clip[..., None] if clip.ndim == 3 else clip


def fit_clip(clip: np.ndarray, size: Sequence[int]) -> Tensor:
    """A uint8 (T, H, W, C) clip as uint8 (C, frames, height, width), ``size`` = (frames, height, width): frames
    picked evenly over the clip (the nearest frame, no blending, so motion stays sharp), each resized bilinearly."""
    frames, height, width = (int(s) for s in size)
    picked = np.linspace(0, clip.shape[0] - 1, frames).round().astype(int)
    video = torch.from_numpy(np.ascontiguousarray(clip[picked])).permute(0, 3, 1, 2)  # T, C, H, W
    if video.shape[-2:] != (height, width):
        video = torch.nn.functional.interpolate(video.float(), size=(height, width), mode="bilinear", align_corners=False,
                                                antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    return video.permute(1, 0, 2, 3).contiguous()


def read_video_labels(csv_path: Path, num_classes: int) -> List[Record]:
    """The clips ``csv_path`` lists, as ``{"image": path, "label": int, "split": "train"|"val"|None}`` records."""
    if not csv_path.is_file():
        raise VideoDataError(f"{csv_path} does not exist; {FOLDER_HINT}")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not {FILE_COLUMN, LABEL_COLUMN} <= set(reader.fieldnames or ()):
            raise VideoDataError(f"{csv_path} has columns {reader.fieldnames}; it needs a header row 'file,label' "
                                 f"(and optionally 'split').")
        records = []
        for line, row in enumerate(reader, start=2):
            name, label = (row[FILE_COLUMN] or "").strip(), (row[LABEL_COLUMN] or "").strip()
            if not label.isdigit() or int(label) >= num_classes:
                raise VideoDataError(f"{csv_path} line {line}: label {label!r} for {name} is not a class index in "
                                     f"0..{num_classes - 1}; use integer labels or set data.num_classes.")
            path = csv_path.parent / name
            if not name or not path.is_file():
                raise VideoDataError(f"{csv_path} line {line} lists {name!r}, but {path} is not a file; copy the clip "
                                     f"there or remove its row.")
            split = (row.get(SPLIT_COLUMN) or "").strip() or None
            if split is not None and split not in SPLITS:
                raise VideoDataError(f"{csv_path} line {line}: split {split!r} for {name} is neither 'train' nor 'val'; "
                                     f"fix it or leave the column empty (data.val_fraction then holds clips out).")
            records.append({"image": str(path), "label": int(label), "split": split})
    if not records:
        raise VideoDataError(f"{csv_path} lists no clips; add one 'file,label' row per clip.")
    return records


class VideoClips(Dataset):
    """Clips as ``{"image": float (C, T, H, W), "label": int, "file": str}``; the first ``cache_rate`` share of
    them are kept in memory (as uint8, after resampling) once read."""

    def __init__(self, records: Sequence[Record], size: Sequence[int], in_channels: int = 1, cache_rate: float = 1.0) -> None:
        self.records = list(records)
        self.size = tuple(int(s) for s in size)
        self.in_channels = in_channels
        self.cached: Dict[int, Tensor] = {}
        self.cache_count = round(len(self.records) * cache_rate)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Tensor:
        """Clip ``index`` as float (C, T, H, W) in [0, 1]."""
        video = self.cached.get(index)
        if video is None:
            video = fit_clip(read_video(Path(self.records[index]["image"]), self.in_channels), self.size)
            if index < self.cache_count:
                self.cached[index] = video
        return video.float().div_(255.0)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = {"image": self.load(index), "file": self.records[index]["image"]}
        if "label" in self.records[index]:
            item["label"] = self.records[index]["label"]
        return item


class EpochSampler(Sampler):
    """``count`` indices of ``size`` in a fresh random order each epoch: without replacement up to ``size``, with it
    beyond. Not a ``RandomSampler``, so that under DDP Lightning wraps it (``DistributedSamplerWrapper``) and every
    rank draws its share of ``count``, instead of replacing it by a sampler over the whole data set."""

    def __init__(self, size: int, count: int) -> None:
        self.size, self.count = size, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        if self.count <= self.size:
            return iter(torch.randperm(self.size)[:self.count].tolist())
        return iter(torch.randint(self.size, (self.count,)).tolist())


class VideoFolder(pl.LightningDataModule):
    """A folder of video clips listed in a labels CSV (``data=video_folder``), for the classification task.

    Validation is the rows whose ``split`` is ``val``; without a split column, ``val_fraction`` of the clips
    (drawn with ``seed``). Training batches are shuffled and all of ``batch_size`` clips (the last, smaller
    batch is dropped), so that every step normalizes over the same number of samples. ``clips_per_epoch``
    makes an epoch that many training clips, drawn afresh each epoch (all of them once when null).
    """

    inputs = VIDEO_INPUTS

    def __init__(self, root: str, task: str = CLASSIFICATION, patch_size: Sequence[int] = (16, 32, 32), batch_size: int = 16,
                 val_fraction: float = 0.2, num_workers: int = 0, cache_rate: float = 1.0, in_channels: int = 1,
                 num_classes: int = 2, labels_csv: str = "labels.csv", clips_per_epoch: Optional[int] = None,
                 seed: int = 0) -> None:
        super().__init__()
        if task != CLASSIFICATION:
            raise VideoDataError(f"video clips carry one class each, but the model selects task={task}; "
                                 f"use a classification model: model=r2plus1d or model=resnet.")
        if len(patch_size) != 3:
            raise VideoDataError(f"data.patch_size={list(patch_size)} must be [frames, height, width].")
        self.root = Path(root).expanduser()
        self.task = task
        self.patch_size = tuple(int(s) for s in patch_size)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.cache_rate = cache_rate
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.labels_csv = labels_csv
        self.clips_per_epoch = clips_per_epoch
        self.seed = seed

    @property
    def dataset_dir(self) -> Path:
        """Where the clips and the CSV are; ``MovingDigits`` points this into its cache."""
        return self.root

    def input_spec(self) -> Dict[str, Any]:
        """What ``adanorm-predict`` needs to read clips as training did (saved in the checkpoint)."""
        return {"format": self.inputs, "in_channels": self.in_channels}

    def list_clips(self) -> Tuple[List[Record], List[Record]]:
        folder = self.dataset_dir
        if not folder.is_dir():
            raise VideoDataError(f"data.root={folder} is not a folder; {FOLDER_HINT}")
        records = read_video_labels(folder / self.labels_csv, self.num_classes)
        if any(record["split"] for record in records):
            training = [record for record in records if record["split"] != "val"]
            validation = [record for record in records if record["split"] == "val"]
            if not training or not validation:
                raise VideoDataError(f"{folder / self.labels_csv} puts every clip in one split; mark some rows 'val' "
                                     f"and some 'train', or leave the split column empty.")
            return training, validation
        if len(records) < 2:
            raise VideoDataError(f"{folder / self.labels_csv} lists 1 clip; training needs at least 2 (one is held out).")
        shuffled = random.Random(self.seed).sample(records, len(records))
        held_out = min(len(records) - 1, max(1, round(len(records) * self.val_fraction)))
        return shuffled[held_out:], shuffled[:held_out]

    def setup(self, stage: Optional[str] = None) -> None:
        training, validation = self.list_clips()
        self.train_set = VideoClips(training, self.patch_size, self.in_channels, self.cache_rate)
        self.val_set = VideoClips(validation, self.patch_size, self.in_channels, self.cache_rate)
        for dataset in (self.train_set, self.val_set):  # every clip decodes before the first step, or the run stops naming it
            for index in range(len(dataset)):
                dataset.load(index)

    def train_dataloader(self) -> DataLoader:
        count = len(self.train_set) if self.clips_per_epoch is None else self.clips_per_epoch
        sampler = EpochSampler(len(self.train_set), count)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=count >= self.batch_size, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)


# --- moving digits -------------------------------------------------------------------------------------------------

DIRECTIONS = ((0.0, 1.0), (0.0, -1.0), (1.0, 0.0), (-1.0, 0.0), (1.0, 1.0), (-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0))
"""(down, right) unit steps: right, left, down, up, then the diagonals (``directions=8``)."""
DIRECTION_NAMES = ("right", "left", "down", "up", "down-right", "up-left", "down-left", "up-right")


def _bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``image`` at float pixel coordinates, zero outside."""
    height, width = image.shape
    padded = np.pad(image, 1)
    y = np.clip(ys + 1.0, 0.0, height + 1 - 1e-6)
    x = np.clip(xs + 1.0, 0.0, width + 1 - 1e-6)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, height + 1), np.minimum(x0 + 1, width + 1)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * ((1 - fx) * padded[y0, x0] + fx * padded[y0, x1])
            + fy * ((1 - fx) * padded[y1, x0] + fx * padded[y1, x1]))


def render_digit(digit: np.ndarray, corners: np.ndarray, size: int, digit_size: float) -> np.ndarray:
    """Frames (T, size, size) showing ``digit`` (8×8, in [0, 1]) scaled to ``digit_size`` pixels with its top-left
    corner at each of ``corners`` (T, 2; float (y, x): sub-pixel motion)."""
    scale = digit.shape[0] / digit_size
    centres = np.arange(size, dtype=np.float64) + 0.5
    ys = (centres[None, :, None] - corners[:, 0, None, None]) * scale - 0.5
    xs = (centres[None, None, :] - corners[:, 1, None, None]) * scale - 0.5
    ys, xs = np.broadcast_arrays(ys, xs)
    return _bilinear(digit, ys, xs)


class MovingDigits(VideoFolder):
    """Moving digits from real handwriting (``data=moving_digits``): scikit-learn's 1,797 8×8 digits
    (``sklearn.datasets.load_digits``, in its wheel), each clip one digit crossing the frame in a straight line.

    The class is the motion: ``directions`` (4: right, left, down, up; 8 adds the diagonals) × ``speeds`` (pixels
    per frame), class = direction × len(speeds) + speed. What makes it more than a threshold:

    * the digit (of 10 kinds, any hand) and its start are random; a small sideways ``drift`` bends the path;
    * a second digit, the distractor, wanders by a random walk (``jitter`` pixels per frame) over the same frame:
      the network must tell a steady motion from a wandering one, not merely see that something moves;
    * every clip has its own "camera": gain, background level, noise and per-frame flicker (``gain_range``,
      ``background_range``, ``noise_range``, ``flicker``), so absolute intensity says nothing and normalization
      over the batch, a clip or a group of channels sees different things.

    Validation clips are drawn from digits (images) that no training clip shows. The clips are written once, as MP4
    files with a ``labels.csv`` (``file,label,split``), into a folder under ``root`` named by every setting and the
    seed (a ``.partial`` folder renamed into place when complete), then read back like a user's own folder.
    """

    def __init__(self, root: str = "~/.cache/adanorm/moving_digits", num_clips: int = 1280, frames: int = 16, size: int = 32,
                 digit_size: float = 12.0, directions: int = 4, speeds: Sequence[float] = (0.4, 1.2), drift: float = 0.15,
                 distractor: bool = True, jitter: float = 1.0, gain_range: Sequence[float] = (0.4, 1.0),
                 background_range: Sequence[float] = (0.0, 0.4), noise_range: Sequence[float] = (0.02, 0.12),
                 flicker: float = 0.1, fps: int = 8, crf: int = 10, **kwargs: Any) -> None:
        kwargs.setdefault("patch_size", (frames, size, size))
        kwargs.setdefault("num_classes", directions * len(speeds))
        super().__init__(root, **kwargs)
        if directions not in (4, 8):
            raise VideoDataError(f"data.directions={directions}: choose 4 (right, left, down, up) or 8 (and the diagonals).")
        if self.num_classes != directions * len(speeds):
            raise VideoDataError(f"data.num_classes={self.num_classes}, but data=moving_digits has directions × speeds = "
                                 f"{directions} × {len(speeds)} = {directions * len(speeds)} classes; "
                                 f"set data.num_classes={directions * len(speeds)}.")
        if size % 2 or not 0 < digit_size < size:
            raise VideoDataError(f"data.size={size}, data.digit_size={digit_size}: the frame must be even (yuv420p) "
                                 f"and larger than the digit.")
        if max(speeds) * (frames - 1) > size - digit_size:
            raise VideoDataError(f"data.speeds={list(speeds)}: at {max(speeds)} pixels per frame the digit crosses more than "
                                 f"the {size - digit_size} free pixels in {frames} frames; lower the speed or the digit size.")
        if num_clips < 2 * self.num_classes:
            raise VideoDataError(f"data.num_clips={num_clips}: at least 2 per class ({2 * self.num_classes}) for training "
                                 f"and validation.")
        self.num_clips = num_clips
        self.frames = frames
        self.size = size
        self.digit_size = float(digit_size)
        self.directions = directions
        self.speeds = tuple(float(speed) for speed in speeds)
        self.drift = drift
        self.distractor = distractor
        self.jitter = jitter
        self.gain_range = tuple(float(g) for g in gain_range)
        self.background_range = tuple(float(b) for b in background_range)
        self.noise_range = tuple(float(n) for n in noise_range)
        self.flicker = flicker
        self.fps = fps
        self.crf = crf

    def signature(self) -> str:
        """The folder under ``root``: changes whenever the generated content would."""
        settings = (self.num_clips, self.frames, self.size, self.digit_size, self.directions, self.speeds, self.drift,
                    self.distractor, self.jitter, self.gain_range, self.background_range, self.noise_range, self.flicker,
                    self.val_fraction, self.fps, self.crf)
        digest = hashlib.sha1(repr(settings).encode()).hexdigest()[:10]
        return f"digits-n{self.num_clips}-{self.frames}x{self.size}x{self.size}-c{self.num_classes}-{digest}-seed{self.seed}"

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.signature()

    def clip(self, rng: np.random.RandomState, digits: np.ndarray, label: int) -> np.ndarray:
        """One uint8 (T, size, size) clip of class ``label`` from ``digits`` (N, 8, 8) in [0, 1]."""
        direction, speed = divmod(label, len(self.speeds))
        step = np.array(DIRECTIONS[direction]) * self.speeds[speed]
        step = step + (step == 0) * rng.uniform(-self.drift, self.drift)  # sideways drift on a straight direction
        free = self.size - self.digit_size
        travel = step * (self.frames - 1)
        start = np.array([rng.uniform(max(0.0, -t), min(free, free - t)) for t in travel])
        times = np.arange(self.frames)[:, None]
        video = render_digit(digits[rng.randint(len(digits))], start + times * step, self.size, self.digit_size)
        if self.distractor:
            walk = rng.uniform(0, free, size=2) + np.cumsum(rng.normal(0, self.jitter, size=(self.frames, 2)), axis=0)
            walk = np.abs((walk + free) % (2 * free) - free)  # reflected at the frame's edges
            video = np.maximum(video, render_digit(digits[rng.randint(len(digits))], walk, self.size, self.digit_size))
        gain, background = rng.uniform(*self.gain_range), rng.uniform(*self.background_range)
        flicker = 1.0 + rng.uniform(-self.flicker, self.flicker, size=(self.frames, 1, 1))
        video = background + gain * (1 - background) * flicker * video
        video = video + rng.normal(0.0, rng.uniform(*self.noise_range), size=video.shape)
        return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)

    def generate(self, folder: Path) -> None:
        """Writes ``num_clips`` MP4 clips (balanced classes) and ``labels.csv`` into ``folder``."""
        from sklearn.datasets import load_digits  # in scikit-learn's wheel: no download

        images = load_digits().images / 16.0
        order = np.random.RandomState(self.seed).permutation(len(images))
        held_out = max(1, round(len(images) * self.val_fraction))
        pools = {"val": images[order[:held_out]], "train": images[order[held_out:]]}
        num_val = max(self.num_classes, round(self.num_clips * self.val_fraction))
        rows = []
        (folder / "clips").mkdir()
        for index in range(self.num_clips):
            split = "val" if index < num_val else "train"
            label = index % self.num_classes
            rng = np.random.RandomState((self.seed * 100_003 + index) % 2**32)
            name = f"clips/{split}_{index:05d}.mp4"
            write_video(folder / name, self.clip(rng, pools[split], label), fps=self.fps, crf=self.crf)
            rows.append({FILE_COLUMN: name, LABEL_COLUMN: label, SPLIT_COLUMN: split})
        with (folder / self.labels_csv).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[FILE_COLUMN, LABEL_COLUMN, SPLIT_COLUMN])
            writer.writeheader()
            writer.writerows(rows)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node. Written into a staging folder renamed into place when
        # complete, so an interrupted run leaves no half data set; an existing folder is read, never rewritten.
        target = self.dataset_dir
        if target.is_dir():
            return
        staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            self.generate(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if not target.is_dir():  # another process may have finished first: its folder is as good
                raise
