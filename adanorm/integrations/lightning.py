"""Lightning callbacks: which mode every adaptive layer ran (so a run shows what the layer did), and
recalibration of the running statistics before validation; and the plugin that syncs adaptive layers under DDP.

Training and eval forwards are counted apart because the same layer picks differently in the two
(batch statistics in training, running statistics or per-sample statistics in eval).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Dict, List, NamedTuple, Optional

import lightning.pytorch as pl
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import Tensor
from torch.nn import Module
from torch.utils.hooks import RemovableHandle

from adanorm.norm import AdaptiveNorm
from adanorm.policy import MODES
from adanorm.recalibration import update_bn

TRAIN, EVAL = "train", "eval"
STAGES = (TRAIN, EVAL)
FALLBACK_FRACTION = "fallback_fraction"
DEFAULT_PREFIX = "norm"


class NormMetric(NamedTuple):
    """One metric :class:`NormModeMonitor` logs, and its key: ``{prefix}/{stage}/{layer}/{name}``.

    The one place that builds and parses these keys, so that the callback that writes them and
    the plots that read them (``adanorm.recipes.plots``) cannot drift apart.

    Args:
        stage (str): ``"train"`` or ``"eval"``.
        layer (str): the module name of the adaptive layer, or ``""`` for the stage's total over
            all layers (key ``{prefix}/{stage}/fallback_fraction``).
        name (str): a mode (the metric is that mode's forward count) or ``"fallback_fraction"``.

    Example:
        >>> from adanorm.integrations.lightning import NormMetric
        >>> NormMetric("train", "encoder.norm1", "instance").key()
        'norm/train/encoder.norm1/instance'
        >>> NormMetric.parse("norm/eval/fallback_fraction")
        NormMetric(stage='eval', layer='', name='fallback_fraction')
    """

    stage: str
    layer: str
    name: str

    def key(self, prefix: str = DEFAULT_PREFIX) -> str:
        """The logged key, under ``prefix`` (the monitor's)."""
        return "/".join(part for part in (prefix, self.stage, self.layer, self.name) if part)

    @classmethod
    def parse(cls, key: str, prefix: str = DEFAULT_PREFIX) -> Optional["NormMetric"]:
        """The metric behind ``key``, or None for a key the monitor does not write (other metrics of the run)."""
        if not key.startswith(f"{prefix}/"):
            return None
        stage, _, rest = key[len(prefix) + 1:].partition("/")
        layer, _, name = rest.rpartition("/")
        if stage not in STAGES or name not in (*MODES, FALLBACK_FRACTION):
            return None
        if not layer and name != FALLBACK_FRACTION:
            return None
        return cls(stage, layer, name)


class NormModeMonitor(pl.Callback):
    """Logs, per epoch and per adaptive layer, how many forwards ran each mode and which share fell back.

    An adaptive layer decides its mode per call, so a run's metrics alone do not say what the
    layers did: whether batch statistics were ever used, or which layers fell back at the last
    patches of an epoch. Training and validation forwards are counted apart, because the same
    layer picks differently in the two.

    Keys (built and parsed by :class:`NormMetric`), with stage ``train`` or ``eval``:
    ``{prefix}/{stage}/{layer}/{mode}`` (forward counts, summed over ranks),
    ``{prefix}/{stage}/{layer}/fallback_fraction`` and ``{prefix}/{stage}/fallback_fraction`` (all
    layers together). A fallback is a forward whose spatial size forced a later mode of the policy's
    chain than the one its batch size alone would choose (``adanorm.policy.is_fallback``, recorded by
    the layer in ``last_fallback_from``): per-sample statistics below ``min_batch_size`` samples are
    the design and count as none.
    Every key is logged every epoch, also at zero, so that all ranks log the same keys under DDP.

    Args:
        prefix (str): the first part of every key. Default: ``"norm"``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from adanorm.integrations.lightning import NormModeMonitor
        >>> trainer = pl.Trainer(callbacks=[NormModeMonitor()])  # doctest: +SKIP
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__()
        self.prefix = prefix
        self._handles: List[RemovableHandle] = []
        self._layers: List[str] = []
        self._counts: Dict[str, Dict[str, Counter]] = {TRAIN: defaultdict(Counter), EVAL: defaultdict(Counter)}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        for name, module in pl_module.named_modules():
            if isinstance(module, AdaptiveNorm):
                self._layers.append(name)
                self._handles.append(module.register_forward_hook(self._hook_for(name)))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._layers = []

    def _hook_for(self, layer: str):
        def count_mode(module: AdaptiveNorm, inputs, output) -> None:
            counts = self._counts[TRAIN if module.training else EVAL][layer]
            counts[module.last_mode] += 1
            counts["fallback"] += int(module.last_fallback_from is not None)

        return count_mode

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counts[TRAIN].clear()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_stage(TRAIN, pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counts[EVAL].clear()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_stage(EVAL, pl_module)

    def _log_stage(self, stage: str, pl_module: pl.LightningModule) -> None:
        if not self._layers:
            return
        # Every layer logs every key, even at zero: under DDP each rank must log the same keys.
        total_forwards = total_fallbacks = 0
        for layer in self._layers:
            counts = self._counts[stage][layer]
            forwards = sum(counts[mode] for mode in MODES)
            total_forwards += forwards
            total_fallbacks += counts["fallback"]
            for mode in MODES:
                self._log(pl_module, NormMetric(stage, layer, mode), counts[mode], "sum")
            self._log(pl_module, NormMetric(stage, layer, FALLBACK_FRACTION), counts["fallback"] / max(forwards, 1), "mean")
        self._log(pl_module, NormMetric(stage, "", FALLBACK_FRACTION), total_fallbacks / max(total_forwards, 1), "mean")

    def _log(self, pl_module: pl.LightningModule, metric: NormMetric, value: float, reduce_fx: str) -> None:
        pl_module.log(metric.key(self.prefix), float(value), on_step=False, on_epoch=True, sync_dist=True, reduce_fx=reduce_fx)


class RecalibrateNorms(pl.Callback):
    """Recomputes running statistics with :func:`adanorm.update_bn` before every validation (PreciseBN).

    Validation and the checkpoints written after it then use statistics of the current weights
    over ``num_batches`` training batches, at any batch size: adaptive layers trained per-sample
    evaluate with population statistics instead, and batch-mode layers lose the lag of their
    momentum. Skipped during Lightning's sanity check.

    Args:
        num_batches (int): training batches to pool the statistics over. Default: ``32``.
        input_key (str): the input's key in dict batches (MONAI's); tensor batches are used as
            they are, list/tuple batches by their first element. Default: ``"image"``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from adanorm.integrations.lightning import RecalibrateNorms
        >>> trainer = pl.Trainer(callbacks=[RecalibrateNorms(num_batches=64)])  # doctest: +SKIP
    """

    def __init__(self, num_batches: int = 32, input_key: str = "image") -> None:
        super().__init__()
        self.num_batches = num_batches
        self.input_key = input_key

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        update_bn(trainer.train_dataloader, pl_module, num_batches=self.num_batches, forward_fn=self._forward)

    def _forward(self, model: pl.LightningModule, batch: Any) -> Tensor:
        inputs = batch[self.input_key] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        inputs = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs  # MONAI MetaTensor: plain tensor
        return model(inputs.to(model.device))


class AdaptiveNormSync(TorchSyncBatchNorm):
    """Lightning's layer-sync plugin for adaptive layers: ``Trainer(plugins=[AdaptiveNormSync()])``.

    ``Trainer(sync_batchnorm=True)`` converts native BatchNorm layers to ``nn.SyncBatchNorm`` and
    leaves adaptive layers per-rank: under DDP at 2 samples per GPU each rank would then decide
    from its own tiny batch. This plugin also turns on ``sync`` for every adaptive layer (batch
    statistics over all ranks, one decision from the global batch; see ``adanorm.functional.sync``).
    Being a ``TorchSyncBatchNorm``, it may also be combined with ``sync_batchnorm=True``;
    ``revert`` undoes both. It takes no arguments.

    Example:
        >>> import lightning.pytorch as pl
        >>> from adanorm.integrations.lightning import AdaptiveNormSync
        >>> trainer = pl.Trainer(strategy="ddp", devices=4, plugins=[AdaptiveNormSync()])  # doctest: +SKIP
    """

    def apply(self, model: Module) -> Module:
        return _set_sync(super().apply(model), True)

    def revert(self, model: Module) -> Module:
        return _set_sync(super().revert(model), False)


def _set_sync(model: Module, sync: bool) -> Module:
    for module in model.modules():
        if isinstance(module, AdaptiveNorm):
            module.sync = sync
    return model
