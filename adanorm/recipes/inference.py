"""Whole-volume (and whole-clip) inference with a recipe checkpoint through ``Trainer.predict``.

Lightning supplies the device placement and the progress bar; a prediction writer saves each
result as soon as its volume is done, so memory does not grow with the number of volumes.

Prediction never destroys data: every output path is planned and checked before the network is
built (no output folder that holds an input, no output onto an input, no existing output unless
``overwrite``), and each file is written under a temporary name in its folder and renamed into
place, so an interrupted run leaves either the old file or the complete new one.
"""
from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from monai.data import DataLoader, Dataset
from torch import Tensor
from torch.utils.data import DataLoader as ClipLoader

from adanorm.recipes.checkpoint import load_recipe_module, read_checkpoint, recipe_module_class
from adanorm.recipes.data import CLASSIFICATION, case_name, volume_transforms
from adanorm.recipes.module import INPUTS_KEY, RecipeModule
from adanorm.recipes.quiet import quiet_third_party
from adanorm.recipes.video import VIDEO_INPUTS, VIDEO_SUFFIXES, VideoClips, VideoDataError, video_inputs
from adanorm.tiling import SOURCES, TileReport

PROBABILITIES_CSV = "probabilities.csv"
TILE_REPORT_CSV = "tile_report.csv"


def nifti_inputs(path: Union[Path, Sequence[Path]]) -> List[Path]:
    """One NIfTI file, or every NIfTI file directly inside a folder; for several paths, each one's, in order."""
    if not isinstance(path, (str, Path)):
        files: List[Path] = []
        for each in path:
            files += [file for file in nifti_inputs(Path(each)) if file not in files]
        return files
    path = Path(path)
    if path.is_file() and case_name(path) is not None:
        return [path]
    if path.is_dir():
        files = [child for child in sorted(path.iterdir()) if child.is_file() and case_name(child) is not None]
        if files:
            return files
    raise FileNotFoundError(f"{path} is neither a .nii/.nii.gz file nor a folder holding some; pass a NIfTI file or folder.")


def prediction_inputs(paths: Sequence[Path]) -> Tuple[List[Path], bool]:
    """The files ``paths`` name and whether they are video clips: NIfTI volumes (files, or every one in a folder),
    else video files (``adanorm.recipes.video.video_inputs``)."""
    try:
        return nifti_inputs(paths), False
    except FileNotFoundError as not_nifti:
        try:
            return video_inputs(paths), True
        except VideoDataError:
            raise FileNotFoundError(f"{not_nifti} A checkpoint trained on video clips takes video files "
                                    f"({', '.join(VIDEO_SUFFIXES)}) or folders of them.") from None


class OutputConflictError(ValueError):
    """Writing the predictions would overwrite an input or an existing file; raised before anything is written."""


def prediction_path(output_dir: Path, source: Path) -> Path:
    """Where the segmentation of ``source`` is written: its own file name, in ``output_dir``."""
    return output_dir / source.name


def planned_outputs(files: Sequence[Path], output_dir: Path, task: str, report_tiles: bool) -> List[Path]:
    """Every file ``predict`` will write for ``files``, in the order it writes them."""
    if task == CLASSIFICATION:
        return [output_dir / PROBABILITIES_CSV]
    planned = [prediction_path(output_dir, source) for source in files]
    return (planned + [output_dir / TILE_REPORT_CSV]) if report_tiles else planned


def refuse_conflicts(files: Sequence[Path], output_dir: Path, planned: Sequence[Path], overwrite: bool) -> None:
    """Raises OutputConflictError unless writing ``planned`` leaves every input untouched and, without
    ``overwrite``, replaces no existing file. Paths are compared resolved, so links and ``./`` count."""
    inputs = {source.resolve(): source for source in files}
    folder = output_dir.resolve()
    if folder in inputs:
        raise OutputConflictError(f"--output {output_dir} is the input file {inputs[folder]}; --output names a folder: "
                                  f"pass --output <another folder>.")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputConflictError(f"--output {output_dir} is a file, not a folder; pass --output <a folder>.")
    held = next((source for resolved, source in inputs.items() if folder in (resolved.parent, source.parent.resolve())), None)
    if held is not None:
        raise OutputConflictError(f"--output {output_dir} holds the input {held}: predictions would overwrite or mix "
                                  f"with the scans (--overwrite does not lift this). Pass --output <another folder>.")
    for path in planned:
        if path.resolve() in inputs:
            raise OutputConflictError(f"{path} leads to the input {inputs[path.resolve()]}; writing it would replace the "
                                      f"input. Remove the link or pass --output <another folder>.")
    existing = [path for path in planned if path.exists() or path.is_symlink()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of the {len(planned)} outputs)" if len(existing) > 1 else ""
        raise OutputConflictError(f"{existing[0]} already exists{more}; pass --overwrite to replace it, "
                                  f"or --output <another folder>.")


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` that becomes ``target`` once the block completes (``os.replace``: readers
    see the old file or the new one, never part of one); on any exception, Ctrl-C included, it is removed.

    The name keeps ``target``'s suffixes, from which nibabel picks the format (``.nii.gz`` compresses), and starts
    with a dot, so that a run killed outright leaves a hidden file that is never read as an input."""
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}{''.join(target.suffixes)}")
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_csv(path: Path, fieldnames: Sequence[str], rows: Sequence[Dict[str, Any]]) -> None:
    """``rows`` as a CSV with a header row, written atomically (``atomic_output``)."""
    with atomic_output(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)


class NiftiPredictionWriter(BasePredictionWriter):
    """Segmentations as NIfTI on the input's grid (affine and header kept); class probabilities as CSV rows."""

    def __init__(self, output_dir: Path, task: str, name_column: str = "image") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.task = task
        self.name_column = name_column
        self.rows: List[Dict[str, Any]] = []
        self.csv_path: Optional[Path] = None

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Tensor,
                           batch_indices: Optional[Sequence[int]], batch: Dict[str, Any], batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        sources = batch["file"] if "file" in batch else batch["image"].meta["filename_or_obj"]  # clips carry "file"
        if self.task == CLASSIFICATION:
            for source, probabilities in zip(sources, prediction.float().cpu().numpy()):
                row = {self.name_column: str(source), "predicted": int(probabilities.argmax())}
                row.update({f"p_{index}": round(float(p), 6) for index, p in enumerate(probabilities)})
                self.rows.append(row)
            return
        source = Path(sources[0])
        original = nib.load(source)
        header = original.header.copy()
        header.set_data_dtype(np.uint8)
        labels = prediction[0].cpu().numpy().astype(np.uint8)
        output = nib.Nifti1Image(labels, original.affine, header)
        output.header.set_slope_inter(1.0, 0.0)  # labels are stored as they are, whatever the input's scaling
        with atomic_output(prediction_path(self.output_dir, source)) as temporary:
            nib.save(output, temporary)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.rows:
            return
        path = self.output_dir / PROBABILITIES_CSV
        write_csv(path, list(self.rows[0]), self.rows)
        self.csv_path = path

    def print_summary(self) -> None:
        """Each volume's class probabilities and the CSV's path; called once the progress bar is closed,
        so the first line does not land on the bar's line."""
        if not self.rows:
            return
        for row in self.rows:
            print(", ".join(f"{key}={value}" for key, value in row.items()))
        print(f"class probabilities: {self.csv_path}")


def write_tile_reports(reports: List[Tuple[str, TileReport]], output_dir: Path) -> Path:
    """Prints each volume's tile report and writes them all to tile_report.csv; returns its path."""
    path = output_dir / TILE_REPORT_CSV
    for image, report in reports:
        print(f"{Path(image).name}: {report}")
    write_csv(path, ["image"] + [field.name for field in fields(TileReport)],
              [{"image": image, **{key: round(value, 6) for key, value in asdict(report).items()}} for image, report in reports])
    print(f"tile report: {path}")
    return path


def predict(checkpoint: Path, inputs: Union[Path, Sequence[Path]], output_dir: Path, overlap: float = 0.5,
            accelerator: str = "auto", num_workers: int = 0, trust_checkpoint: bool = False, norm_stats: str = "tile",
            report_tiles: bool = False, overwrite: bool = False) -> Path:
    """Predicts every input volume at batch 1 and returns the folder the results were written to.

    ``inputs`` are files or folders (every file of the kind directly inside): NIfTI volumes, or for a checkpoint
    trained on video clips (``data=moving_digits``, ``data=video_folder``) video files, each resampled to the
    training clip size as in training.

    ``trust_checkpoint`` lets the checkpoint build a network outside MONAI and adanorm
    (see ``adanorm.recipes.checkpoint``): only for checkpoints you wrote yourself. ``norm_stats`` is
    where per-sample norm layers take their statistics from in sliding-window inference
    (``adanorm.norm_statistics``); ``report_tiles`` also predicts each volume in one forward
    (``adanorm.tiling.whole_volume_prediction``) and writes how far the tiled prediction is from it
    (``adanorm.tiling.tile_report``). ``overwrite`` lets existing output files be replaced; inputs never are.

    Raises:
        OutputConflictError: before the network is built or anything is written, if ``output_dir`` is or holds
            an input, an output would land on an input (through a link), or, unless ``overwrite``, an output
            file already exists.
    """
    if norm_stats not in SOURCES:
        raise ValueError(f"norm_stats={norm_stats!r} is unknown; choose one of {SOURCES}.")
    files, clips = prediction_inputs([Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(path) for path in inputs])
    saved = read_checkpoint(checkpoint)
    task = recipe_module_class(saved, checkpoint).task  # which files it writes, without building it
    spec = saved.get(INPUTS_KEY) if isinstance(saved.get(INPUTS_KEY), dict) else {}
    if clips != (spec.get("format") == VIDEO_INPUTS):
        trained, given = ("NIfTI volumes", "video clips") if clips else ("video clips", "NIfTI volumes")
        raise VideoDataError(f"{checkpoint} was trained on {trained}, but the inputs are {given} ({files[0]}, ...); "
                             f"pass {trained} to this checkpoint.")
    output_dir = Path(output_dir)
    refuse_conflicts(files, output_dir, planned_outputs(files, output_dir, task, report_tiles), overwrite)
    module: RecipeModule = load_recipe_module(checkpoint, trust_checkpoint=trust_checkpoint)
    if module.task == CLASSIFICATION:
        if norm_stats != "tile" or report_tiles:
            raise ValueError("--norm-stats and --tile-report are for segmentation checkpoints (sliding-window inference); "
                             "a classification checkpoint already sees each volume whole.")
    else:
        module.hparams.predict_overlap = overlap
        module.predict_norm_stats = norm_stats
        module.tile_reports = [] if report_tiles else None
    output_dir.mkdir(parents=True, exist_ok=True)
    if clips:  # decoded and resampled as in training (adanorm.recipes.video.VideoClips)
        dataset = VideoClips([{"image": str(path)} for path in files], module.patch_size, int(spec.get("in_channels", 1)),
                             cache_rate=0.0)
        loader = ClipLoader(dataset, batch_size=1, num_workers=num_workers)
    else:
        dataset = Dataset([{"image": str(path)} for path in files],
                          volume_transforms(module.task, module.patch_size, train=False, with_label=False))
        loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    writer = NiftiPredictionWriter(output_dir, module.task, name_column="file" if clips else "image")
    with quiet_third_party():  # Lightning's LeafSpec deprecation warning and cloud-logger tip
        trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                             callbacks=[writer])
        trainer.predict(module, loader, return_predictions=False)
    writer.print_summary()  # after trainer.predict: the progress bar has finished its line
    if report_tiles:
        write_tile_reports(module.tile_reports, output_dir)
    return output_dir
