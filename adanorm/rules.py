"""The adaptive layer's rules, each written once, over plain values and tensors.

The eager layers (``adanorm.norm``), their scripted form (``adanorm.scripting``) and the tools that read
a layer's eval statistics (``adanorm.tiling``) call these functions, and ``torch.jit.script`` compiles
them as they are, so a scripted network decides what the eager one decides. Hence TorchScript's subset,
as in ``adanorm.policy``'s plain-value functions: no module globals inside a function (constants come in
as arguments or defaults), lists rather than tuples, an ``Optional`` checked before use.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Union

import torch
from torch import Tensor

from adanorm.policy import candidates, choose, fallback_from, usable
from adanorm.presets import step_factor

BALANCE_DECAY = 0.9
"""Weight of the past in ``running_stats_balance``: about the last ten training steps decide."""


def running_stats_learned(native_eval_rule: bool, running_mean: Tensor, running_var: Tensor,
                          num_batches_tracked: Optional[Tensor]) -> bool:
    """Whether the running statistics describe training data rather than their initial mean 0 and
    variance 1, which are no normalization: a step counted, or values moved (old checkpoints carry real
    statistics with a zero counter). ``native_eval_rule`` (``Policy``, set by ``convert``) takes them as
    they are, as native BatchNorm does. Reads the tensors back: one host sync."""
    if native_eval_rule:
        return True
    if num_batches_tracked is not None and bool(num_batches_tracked > 0):
        return True
    return bool(running_mean.ne(0).any()) or bool(running_var.ne(1).any())


def eval_uses_running_stats(track_running_stats: bool, native_eval_rule: bool, running_mean: Optional[Tensor],
                            running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                            running_stats_balance: Optional[Tensor]) -> bool:
    """The eval rule: auto mode evaluates with the running statistics when they are tracked, learned
    (``running_stats_learned``) and current, ``running_stats_balance >= 0``: the layer's recent training
    steps mostly updated them (``balance_target``). Otherwise eval walks the policy's chain without batch
    mode. Reads the tensors back: one host sync."""
    if not track_running_stats or running_mean is None or running_var is None or running_stats_balance is None:
        return False
    return bool(running_stats_balance >= 0) and running_stats_learned(
        native_eval_rule, running_mean, running_var, num_batches_tracked)


class StepPlan(NamedTuple):
    """What one forward runs (``step_plan``)."""

    mode: Optional[str]
    """The mode; ``None`` where a forced mode cannot normalize the shape (the layer raises)."""
    fallback_from: Optional[str]
    """The mode the batch size alone would have chosen, where the spatial size forced ``mode`` instead
    (a fallback, which the eager layer reports and a strict policy refuses); else ``None``."""
    uses_running_stats: bool
    """Whether the step reads or updates the running statistics (``step_uses_running_stats``)."""


def step_plan(shape: List[int], training: bool, layer_mode: str, chain: List[str], eval_batch_stats: bool,
              num_groups: int, min_batch_size: int, min_instance_size: int, min_group_size: int,
              instance_running_stats: bool, track_running_stats: bool, has_running_stats: bool,
              eval_rule: bool) -> StepPlan:
    """The rules composed for one forward of input ``shape``: a forced ``layer_mode`` where it can run
    (``forced_mode_runs``), else auto mode's walk of the policy's chain (``adanorm.policy``), and the
    buffers the step uses. ``has_running_stats``: the buffers exist; ``eval_rule``: what
    ``eval_uses_running_stats`` says, read in eval only. The policy's settings come in as plain values."""
    if layer_mode != "auto":
        if not forced_mode_runs(layer_mode, shape, num_groups, training, has_running_stats):
            return StepPlan(None, None, False)
        return StepPlan(layer_mode, None, step_uses_running_stats(
            layer_mode, layer_mode, training, track_running_stats, instance_running_stats, has_running_stats, eval_rule))
    walked = candidates(training, chain, eval_batch_stats)
    evaluates_with_running_stats = eval_rule and not training
    mode = choose(shape, training, walked, num_groups, min_batch_size, min_instance_size, min_group_size,
                  evaluates_with_running_stats)
    return StepPlan(mode, fallback_from(mode, training, evaluates_with_running_stats, walked, shape[0], num_groups,
                                        min_batch_size),
                    step_uses_running_stats(mode, layer_mode, training, track_running_stats, instance_running_stats,
                                            has_running_stats, eval_rule))


def forced_mode_runs(mode: str, shape: List[int], num_groups: int, training: bool, has_running_stats: bool) -> bool:
    """Whether a layer forced to ``mode`` can normalize ``shape``: where the native module it stands for
    can, i.e. no statistic over a single value, or in eval batch mode with running statistics to read."""
    if mode == "batch" and not training and has_running_stats:
        return True
    return usable(mode, shape, num_groups, True, 1, 2, 2)


def step_uses_running_stats(mode: str, layer_mode: str, training: bool, track_running_stats: bool,
                            instance_running_stats: bool, has_running_stats: bool, eval_rule: bool) -> bool:
    """Whether a step that runs ``mode`` reads or updates the running statistics (``has_running_stats``:
    the buffers exist; ``eval_rule``: what ``eval_uses_running_stats`` says, read in eval only).

    Training updates them in batch mode, as ``nn.BatchNorm``, and in instance mode under
    ``Policy.instance_running_stats``, as ``nn.InstanceNorm(track_running_stats=True)``. In eval auto mode
    reads them where the eval rule chose them; a forced mode reads them where its native module would,
    whether or not it still tracks them."""
    per_mode = mode == "batch" or (mode == "instance" and instance_running_stats)
    if training:
        return track_running_stats and has_running_stats and per_mode
    if layer_mode == "auto":
        return mode == "batch" and eval_rule
    return has_running_stats and per_mode


def running_stats_factor(batch_size: int, num_batches_tracked: Optional[Tensor], count_step: bool,
                         momentum: Optional[float], window_samples: int) -> Union[float, Tensor]:
    """This step's running-statistics update factor, after counting the step in ``num_batches_tracked``
    where ``count_step``: batch steps count, as in ``nn.BatchNorm``; instance steps do not, as in
    ``nn.InstanceNorm``. A fixed ``momentum`` is the factor; ``None`` makes it depend on the step count
    (``MomentumPreset``: cumulative, or ``window_samples`` samples)."""
    if num_batches_tracked is not None and count_step:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        return 0.0
    return step_factor(batch_size, num_batches_tracked, window_samples)


def balance_target(running_stats_balance: Tensor, updated_running_stats: bool) -> Tensor:
    """Where a training step moves ``running_stats_balance``: +1 for a step that updated the running
    statistics, -1 for one that left them behind (a per-sample mode); a tensor like the balance."""
    return torch.full_like(running_stats_balance, 1.0 if updated_running_stats else -1.0)


def update_balance(running_stats_balance: Tensor, target: Tensor, decay: float) -> None:
    """One training step's move of the balance toward ``target`` (``balance_target``), in place:
    ``balance ← decay·balance + (1 − decay)·target``, with ``decay`` the layers' ``BALANCE_DECAY``.

    One step decides after a load (the balance is then 0); a run of about seven steps decides after
    long training in the other regime. So a smaller last batch per epoch does not switch a batch-trained
    layer's eval to per-sample statistics, while fine-tuning that really moved to a per-sample mode does."""
    running_stats_balance.lerp_(target, 1.0 - decay)
