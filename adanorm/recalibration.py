"""Recompute running statistics from data (PreciseBN), for adaptive and native batch-norm layers alike.

Running statistics drift away from the weights they are used with: an EMA or SWA average of weights
was never trained with any statistics, fine-tuning at small batch moves the weights faster than a
momentum of 0.01 follows, and statistics from the first epochs of a short run describe a model that
no longer exists. ``torch.optim.swa_utils.update_bn`` fixes this for ``_BatchNorm`` subclasses only
(it skips adaptive layers, which are not ``_BatchNorm``), averages per-batch variances, and gets its
statistics from whatever the layer normalizes with in training — for an adaptive layer at batch 2,
instance statistics, which are not what eval uses.

``update_bn`` takes the same call. Every layer whose eval normalizes with running statistics gets
them replaced by the exact mean and unbiased variance of all values its input held over the loader
(Chan's pooled formula in float64, so batch size and count do not matter), with every upstream
batch-norm layer normalizing with batch statistics as it would in batch-mode training.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from adanorm.norm import AdaptiveNorm

ForwardFn = Callable[[nn.Module, Any], Any]


class _PooledMoments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def add(self, values: Tensor) -> None:
        channels_first = values.detach().transpose(0, 1).reshape(values.shape[1], -1).double()
        count = channels_first.shape[1]
        if count == 0:
            return
        mean = channels_first.mean(1)
        m2 = (channels_first - mean[:, None]).square().sum(1)
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def variance(self) -> Tensor:
        """Unbiased, as BatchNorm's running variance."""
        return self.m2 / max(self.count - 1, 1)


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

    Call it after training with EMA/SWA weights, after fine-tuning at small batch, or whenever
    eval should use statistics of the final weights. Each layer's running mean and variance
    become the exact mean and unbiased variance of all values its input held over ``loader``,
    at any batch size, including batch 1. ``num_batches_tracked`` becomes the number of batches
    seen, and the layer's eval then uses these statistics (see the README's eval rule).
    InstanceNorm-style running statistics are left alone, as in torch.

    Args:
        loader: batches, as for ``torch.optim.swa_utils.update_bn``.
        model: the model; its train/eval flag is restored afterwards.
        device: if given, each input is moved there first.
        num_batches: stop after this many batches (PreciseBN suggests ~10^3–10^4 samples in all).
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch that is not a tensor or a
            list/tuple of tensors (e.g. MONAI's dict batches); inputs are then not moved to ``device``.
        progress: show a progress bar (needs tqdm).
    """
    layers = _recalibrated_layers(model)
    if not layers:
        return
    moments: Dict[nn.Module, _PooledMoments] = {layer: _PooledMoments() for layer in layers}
    handles = [layer.register_forward_pre_hook(lambda layer, inputs: moments[layer].add(inputs[0])) for layer in layers]
    policies = {layer: layer.policy for layer in layers if isinstance(layer, AdaptiveNorm)}
    for layer, policy in policies.items():
        # Batch statistics from one sample up, as the eval statistics assume of every upstream layer.
        layer.policy = replace(policy, chain=("batch",) + tuple(m for m in policy.chain if m != "batch"), min_batch_size=1)
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
        for layer, policy in policies.items():
            layer.policy = policy
        model.train(was_training)
    for layer, pooled in moments.items():
        _write_statistics(layer, pooled, seen)


def _write_statistics(layer: nn.Module, pooled: _PooledMoments, batches: int) -> None:
    if pooled.count == 0:
        return
    layer.running_mean.copy_(pooled.mean)
    layer.running_var.copy_(pooled.variance())
    layer.num_batches_tracked.fill_(batches)
    if isinstance(layer, AdaptiveNorm):
        layer.running_stats_balance.fill_(1.0)  # fresh statistics of the current weights: eval uses them
