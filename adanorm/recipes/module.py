"""LightningModules for the recipes.

The network arrives as its config (``_target_`` + arguments) and is built here, so a checkpoint
carries everything needed to rebuild the model: ``predict.py`` needs only the checkpoint.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.utils import convert_to_tensor
from torch import Tensor, nn

from adanorm.tiling import TileReport, downsampling_factors, norm_statistics, tile_report, whole_volume_prediction

CLASS_PATH_KEY = "adanorm_module_class"
"""Checkpoint key naming the recipe module that wrote it, as a key of ``RECIPE_MODULES``."""
INPUTS_KEY = "adanorm_inputs"
"""Checkpoint key describing what the model read in training, from the data module's ``input_spec()``, e.g.
``{"format": "video", "in_channels": 1}`` (``adanorm.recipes.video``); absent for NIfTI volumes."""


class RecipeModule(pl.LightningModule):
    """Optimisation and checkpoint plumbing shared by the tasks; subclasses define loss, metric and output.

    ``net`` is a plain dict (Hydra: ``_convert_: all``) so that the checkpoint holds no OmegaConf objects.
    """

    task: str
    monitor: str

    def __init__(self, net: Dict[str, Any], num_classes: int, patch_size: Sequence[int], lr: float = 3e-3,
                 weight_decay: float = 1e-5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module = instantiate(net, _convert_="all")
        self.patch_size = tuple(patch_size)
        self.channels_last = False
        """Whether the network's weights and every batch's images are in ``torch.channels_last_3d``
        (``use_channels_last``); how the run executes, not part of the checkpoint's model."""

    def use_channels_last(self) -> None:
        """Keeps the weights, and from now on every batch's 5-D images, in ``torch.channels_last_3d`` memory format
        (``adanorm-train channels_last=true``)."""
        self.net = self.net.to(memory_format=torch.channels_last_3d)
        self.channels_last = True

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    def tensors(self, batch: Dict[str, Any], *keys: str) -> Tuple[Tensor, ...]:
        """The batch's tensors without MONAI metadata, which would otherwise flow into logged metrics and checkpoints;
        5-D images in ``torch.channels_last_3d`` after ``use_channels_last``."""
        tensors = [convert_to_tensor(batch[key], track_meta=False) for key in keys]
        if self.channels_last:
            tensors = [t.contiguous(memory_format=torch.channels_last_3d) if key == "image" and t.ndim == 5 else t
                       for key, t in zip(keys, tensors)]
        return tuple(tensors)

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        image, label = self.tensors(batch, "image", "label")
        loss = self.loss(self.net(image), label)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=image.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CLASS_PATH_KEY] = type(self).__name__
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "input_spec"):
            checkpoint[INPUTS_KEY] = datamodule.input_spec()


class SegmentationModule(RecipeModule):
    """Trains on patches; validates and predicts whole volumes by Gaussian-blended sliding windows."""

    task = "segmentation"
    monitor = "val/dice"

    def __init__(self, *args: Any, val_overlap: float = 0.25, predict_overlap: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.dice = DiceMetric(include_background=False, reduction="mean")
        self.predict_norm_stats = "tile"
        """Where prediction takes per-sample norm statistics from: "tile", "running" or "volume" (adanorm.tiling)."""
        self.tile_reports: Optional[List[Tuple[str, TileReport]]] = None
        """A list to collect each predicted volume's (file, tile report) in, or None for no reports."""

    def infer(self, image: Tensor, overlap: float, progress: bool = False) -> Tensor:
        """Logits for whole volumes of any size (padded where smaller than the patch)."""
        return sliding_window_inference(image, self.patch_size, sw_batch_size=4, predictor=self.net,
                                        overlap=overlap, mode="gaussian", progress=progress)

    def validation_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        image, label = self.tensors(batch, "image", "label")
        logits = self.infer(image, self.hparams.val_overlap)
        self.log("val/loss", self.loss(logits, label), batch_size=1)
        num_classes = self.hparams.num_classes
        self.dice(one_hot(logits.argmax(1, keepdim=True), num_classes), one_hot(label, num_classes))

    def on_validation_epoch_end(self) -> None:
        self.log("val/dice", self.dice.aggregate().item(), prog_bar=True, sync_dist=True)
        self.dice.reset()

    def whole_volume(self, image: Tensor) -> Tensor:
        """Logits of the whole volume in one forward, from its own voxels only: unpadded wherever its size is a
        multiple of the network's downsampling factors (measured on the training patch, which the network
        accepts), otherwise padded to them with the padding kept out of every statistic
        (``adanorm.tiling.whole_volume_prediction``)."""
        multiple = downsampling_factors(self.net, image.new_zeros(1, image.shape[1], *self.patch_size))
        return whole_volume_prediction(self.net, image, multiple)

    def predict_step(self, batch: Dict[str, Any], batch_idx: int) -> Tensor:
        """Whole-volume statistics are gathered over non-overlapping windows: each voxel counts once,
        and a pass has about 2^3 times fewer windows than the prediction at overlap 0.5."""
        (image,) = self.tensors(batch, "image")
        overlap = self.hparams.predict_overlap
        with norm_statistics(self.net, self.predict_norm_stats, progress=True) as stats:
            stats.gather(lambda: self.infer(image, 0.0))
            logits = self.infer(image, overlap)
        if self.tile_reports is not None:
            # The reference uses the same statistics; "volume" statistics of a single window are its own.
            with norm_statistics(self.net, "running" if self.predict_norm_stats == "running" else "tile"):
                whole = self.whole_volume(image)
            self.tile_reports.append((batch["image"].meta["filename_or_obj"][0],
                                      tile_report(logits, whole, self.patch_size, overlap)))
        return logits.argmax(1)


class ClassificationModule(RecipeModule):
    """Whole volumes in, one class per volume out."""

    task = "classification"
    monitor = "val/accuracy"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss = nn.CrossEntropyLoss()

    def validation_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        image, label = self.tensors(batch, "image", "label")
        logits = self.net(image)
        self.log("val/loss", self.loss(logits, label), batch_size=logits.shape[0])
        accuracy = (logits.argmax(1) == label).float().mean()
        self.log("val/accuracy", accuracy, prog_bar=True, batch_size=logits.shape[0])

    def predict_step(self, batch: Dict[str, Any], batch_idx: int) -> Tensor:
        (image,) = self.tensors(batch, "image")
        return self.net(image).softmax(1)


RECIPE_MODULES: Dict[str, Type[RecipeModule]] = {cls.__name__: cls for cls in (SegmentationModule, ClassificationModule)}
"""The modules a checkpoint may name: looked up here by name, never imported from a path in the file."""
