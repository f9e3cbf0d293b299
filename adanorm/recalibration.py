"""Recompute running statistics from data (PreciseBN), for adaptive and native batch-norm layers alike.

Running statistics drift away from the weights they are used with: an EMA or SWA average of weights
was never trained with any statistics, fine-tuning at small batch moves the weights faster than a
momentum of 0.01 follows, and statistics from the first epochs of a short run describe a model that
no longer exists. ``torch.optim.swa_utils.update_bn`` fixes this for ``_BatchNorm`` subclasses only
(it skips adaptive layers, which are not ``_BatchNorm``), averages per-batch variances, and gets its
statistics from whatever the layer normalizes with in training — for an adaptive layer at batch 2,
per-sample (group or instance) statistics, which are not what eval uses.

``update_bn`` takes the same call. Every layer whose eval normalizes with running statistics gets
them replaced by the exact mean and unbiased variance of all values its input held over the loader
(Chan's pooled formula in float64, so batch size and count do not matter), with every upstream
batch-norm layer normalizing with batch statistics as it would in batch-mode training. Synced
layers (``sync=True``, ``nn.SyncBatchNorm``) pool over every rank's loader (one all_gather each).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from adanorm.functional.running_stats import Moments, moments
from adanorm.functional.sync import is_synced, merge_across_ranks
from adanorm.norm import AdaptiveNorm

ForwardFn = Callable[[nn.Module, Any], Any]


def _recalibrated_layers(model: nn.Module) -> List[nn.Module]:
    """Layers whose eval can normalize with running statistics computed from batch statistics."""
    layers: List[nn.Module] = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            layers.append(module)
        elif isinstance(module, AdaptiveNorm) and module.track_running_stats and module.mode in ("auto", "batch"):
            layers.append(module)
    return layers


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """What ``torch.optim.swa_utils.update_bn`` feeds the model: a tensor, or a list/tuple's first element."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(
            f"update_bn got a {type(batch).__name__} batch from the loader; pass forward_fn=lambda model, batch: "
            f"model(batch['image']) (or whatever feeds your model) for batches that are not tensors."
        )
    return model(batch)


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    device: Optional[Union[str, torch.device]] = None,
    *,
    num_batches: Optional[int] = None,
    forward_fn: Optional[ForwardFn] = None,
    progress: bool = False,
) -> None:
    """Recompute the running statistics of every adaptive and native batch-norm layer in ``model``.

    Running statistics lag behind the weights they are used with: EMA and SWA weights were never
    trained with any, fine-tuning at small batch moves the weights faster than a small momentum
    follows, and a short run's statistics still carry its first epochs. ``update_bn`` replaces
    them by statistics of the current weights over ``loader`` (PreciseBN). Unlike
    ``torch.optim.swa_utils.update_bn``, which it can replace call for call, it also reaches
    adaptive layers, and every layer gets the exact mean and unbiased variance of all values its
    input held over the loader (pooled in float64 with Chan's formula), at any batch size,
    including batch 1, with every layer upstream normalizing with batch statistics.

    Layers that evaluate with running statistics are recalibrated: native ``_BatchNorm`` layers
    with ``track_running_stats=True`` and adaptive layers in ``mode="auto"`` or ``"batch"``. Their
    ``num_batches_tracked`` becomes the number of batches seen, and adaptive layers then evaluate
    with these statistics. InstanceNorm-style running statistics are left alone, as in torch.
    Synced layers (``sync=True``, ``nn.SyncBatchNorm``) pool over every rank's loader.

    Args:
        loader (Iterable): batches, each a tensor or a list/tuple whose first element is the input
            tensor (as for ``torch.optim.swa_utils.update_bn``), or anything ``forward_fn`` takes.
        model (nn.Module): the model; its train/eval flag is restored afterwards.
        device (str or torch.device, optional): if given, each input is moved there first.
            Default: ``None``.
        num_batches (int, optional): stop after this many batches; PreciseBN suggests 10^3–10^4
            samples in all. Default: ``None`` (the whole loader).
        forward_fn (Callable, optional): ``forward_fn(model, batch)`` runs the model on a batch that
            is neither a tensor nor a list/tuple of tensors (MONAI's dict batches, for one); inputs
            are then not moved to ``device``. Default: ``None``.
        progress (bool): show a progress bar (needs tqdm). Default: ``False``.

    Raises:
        TypeError: if a batch is not a tensor or a list/tuple of tensors and ``forward_fn`` is not given.

    Example:
        >>> import torch, adanorm
        >>> from torch import nn
        >>> model = adanorm.convert(nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4)))
        >>> loader = [torch.randn(2, 1, 8, 8, 8) for _ in range(5)]
        >>> adanorm.update_bn(loader, model)
        >>> int(model[1].num_batches_tracked)
        5
        >>> # MONAI dict batches:
        >>> dict_loader = [{"image": batch} for batch in loader]
        >>> adanorm.update_bn(dict_loader, model, forward_fn=lambda model, batch: model(batch["image"]))
    """
    layers = _recalibrated_layers(model)
    if not layers:
        return
    pooled: Dict[nn.Module, Moments] = {}

    def add_batch(layer: nn.Module, inputs: Any) -> None:
        batch = moments(inputs[0])
        pooled[layer] = pooled[layer].merge(batch) if layer in pooled else batch

    handles = [layer.register_forward_pre_hook(add_batch) for layer in layers]
    settings = {layer: (layer.policy, layer.sync) for layer in layers if isinstance(layer, AdaptiveNorm)}
    for layer, (policy, _) in settings.items():
        # Batch statistics from one sample up, as the eval statistics assume of every upstream layer; local
        # ones (ranks may see different numbers of batches): synced layers pool over the ranks at the end.
        layer.policy = replace(policy, chain=("batch",) + tuple(m for m in policy.chain if m != "batch"), min_batch_size=1)
        layer.sync = False
    was_training = model.training
    model.train()
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="update_bn", total=num_batches)
    seen = 0
    try:
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            if forward_fn is not None:
                forward_fn(model, batch)
            else:
                if device is not None:
                    batch = [item.to(device) for item in batch] if isinstance(batch, (list, tuple)) else batch.to(device)
                _default_forward(model, batch)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for layer, (policy, sync) in settings.items():
            layer.policy, layer.sync = policy, sync
        model.train(was_training)
    for layer in layers:  # in module order, the same on every rank: synced layers gather in step
        local = pooled.get(layer) or Moments(0.0, *torch.zeros(2, layer.num_features, dtype=torch.float64))
        _write_statistics(layer, _across_synced_ranks(layer, local), seen)


def _across_synced_ranks(layer: nn.Module, local: Moments) -> Moments:
    """A synced layer's statistics cover every rank's data, as its training statistics do."""
    process_group = getattr(layer, "process_group", None)
    synced = isinstance(layer, nn.SyncBatchNorm) or getattr(layer, "sync", False)
    return merge_across_ranks(local, process_group) if synced and is_synced(process_group) else local


def _write_statistics(layer: nn.Module, pooled: Moments, batches: int) -> None:
    if pooled.count == 0:
        return
    layer.running_mean.copy_(pooled.mean)
    layer.running_var.copy_(pooled.m2 / max(pooled.count - 1, 1))  # unbiased, as BatchNorm's running variance
    layer.num_batches_tracked.fill_(batches)
    if isinstance(layer, AdaptiveNorm):
        layer.running_stats_balance.fill_(1.0)  # fresh statistics of the current weights: eval uses them
