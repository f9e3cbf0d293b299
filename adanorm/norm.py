"""Adaptive normalization modules: the state (parameters, running statistics, telemetry) around
``adanorm.functional.adaptive_norm``, with ``nn.BatchNorm``'s constructor and state_dict.

The modules derive from ``_NormBase`` (as ``nn.BatchNorm`` and ``nn.InstanceNorm`` do) for the
identical checkpoint layout, but not from ``_BatchNorm``: ``nn.SyncBatchNorm.convert_sync_batchnorm``
and Lightning's ``sync_batchnorm=True`` replace every ``_BatchNorm`` and would silently drop the
adaptive behaviour.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Any, Dict, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from adanorm.functional.api import normalize
from adanorm.functional.dispatch import capturing
from adanorm.functional.renorm import RenormClip, RenormLimits, renorm_factors, renormalize
from adanorm.functional.sync import gather_batch, is_synced, synced_batch_norm
from adanorm.policy import (
    MODES,
    FallbackError,
    FallbackWarning,
    NonFiniteStatsWarning,
    Policy,
    check_num_groups,
    get_policy,
)
from adanorm.presets import MomentumPreset, get_preset
from adanorm.rules import (
    BALANCE_DECAY,
    StepPlan,
    balance_target,
    eval_uses_running_stats,
    running_stats_factor,
    step_plan,
    step_uses_running_stats,
    update_balance,
)
from adanorm.scripting import ScriptableAdaptiveNorm
from adanorm.warning_site import calling_site, first_report, layer_path

MODE_CHOICES = ("auto",) + MODES
_RunningStats = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]
"""``(running_mean, running_var, num_batches_tracked, running_stats_balance)``: ``AdaptiveNorm._running_stats()``."""
_LOW_PRECISION = (torch.float16, torch.bfloat16)
BALANCE_CHECK_STEPS = 64
"""Steps in one direction between checks of whether the balance has reached its update's fixed point."""


def plan_step(shape: Tuple[int, ...], training: bool, layer_mode: str, policy: Policy, num_groups: int,
              track_running_stats: bool, has_running_stats: bool, eval_rule: bool) -> StepPlan:
    """``rules.step_plan`` for a ``Policy``. A pure function of its arguments, so the eager hot path asks
    it through one cache per call (``_cached_plan_step``, keyed on the shape, whose batch size the
    designed mode depends on); compiled code calls it uncached: dynamo folds it into the graph and would
    warn about a cache it bypasses."""
    return step_plan(list(shape), training, layer_mode, list(policy.chain), policy.eval_batch_stats, num_groups,
                     policy.min_batch_size, policy.min_instance_size, policy.min_group_size,
                     policy.instance_running_stats, track_running_stats, has_running_stats, eval_rule)


_cached_plan_step = lru_cache(maxsize=4096)(plan_step)


class _EvalRuleMemo:
    """The eval rule's last answer (``rules.eval_uses_running_stats``), reused while its inputs stand still.

    Invariant: the rule reads only ``policy.native_eval_rule`` and four tensors (``num_batches_tracked``,
    ``running_mean``, ``running_var``, ``running_stats_balance``; tracking is checked before the memo is
    asked). The memo holds the setting, the tensors themselves and each one's version counter, which
    every in-place write through torch bumps (``copy_``, ``load_state_dict``, ``AveragedModel``, a DDP
    broadcast, a training step). The same setting, the same tensor objects and the same versions therefore
    mean unchanged inputs and an unchanged answer; anything else recomputes it (one host sync). Writes
    that bypass the version counters (through ``.data``, or a NumPy view) are seen at the next
    ``train()``/``eval()`` or ``load_state_dict``, which recompute always.
    """

    __slots__ = ("native_eval_rule", "tensors", "versions", "value")

    def __init__(self) -> None:
        self.native_eval_rule = False
        self.tensors: Tuple[Optional[Tensor], ...] = (None, None, None, None)
        self.versions: Tuple[int, ...] = ()
        self.value = False

    def answer(self, native_eval_rule: bool, steps: Tensor, mean: Tensor, var: Tensor, balance: Tensor,
               recompute: bool) -> bool:
        """The rule for these tensors as they are now, recomputed only when an input changed or when told to."""
        versions = (steps._version, mean._version, var._version, balance._version)
        tensors = self.tensors
        if (recompute or versions != self.versions or steps is not tensors[0] or mean is not tensors[1]
                or var is not tensors[2] or balance is not tensors[3] or native_eval_rule != self.native_eval_rule):
            self.value = eval_uses_running_stats(True, native_eval_rule, mean, var, steps, balance)
            self.native_eval_rule, self.tensors, self.versions = native_eval_rule, (steps, mean, var, balance), versions
        return self.value


class _BalanceRun:
    """Consecutive eager training steps that moved one ``running_stats_balance`` toward one target.

    Invariant: while ``balance._version == version``, every write to the balance since the run began was
    the run's own ``rules.update_balance`` toward ``target``. Once ``settled``, one more update leaves the
    balance unchanged (the rounded update toward ±1 has reached its fixed point, and a fixed point of a
    deterministic update stays one), so skipping later steps in the same direction writes nothing the
    rule would have changed. Every ``BALANCE_CHECK_STEPS``-th step computes the update out of place to
    find out. A write from elsewhere (a load, a copy, a reset) or a step in the other direction ends the run.
    """

    __slots__ = ("balance", "updated_running_stats", "target", "version", "steps", "settled")

    def __init__(self, balance: Tensor, updated_running_stats: bool) -> None:
        self.balance = balance
        self.updated_running_stats = updated_running_stats
        self.target = balance_target(balance, updated_running_stats)
        self.version = balance._version
        self.steps = 0
        self.settled = False

    def step(self, balance: Tensor, updated_running_stats: bool) -> bool:
        """Take this training step if it extends the run (the same balance, untouched since the run's last
        step, and the same direction); ``False``, writing nothing, if it starts a new run."""
        if (balance is not self.balance or balance._version != self.version
                or updated_running_stats != self.updated_running_stats):
            return False
        if self.settled:
            return True
        self.steps += 1
        if self.steps % BALANCE_CHECK_STEPS:
            update_balance(self.balance, self.target, BALANCE_DECAY)
        else:
            moved = self.balance.clone()
            update_balance(moved, self.target, BALANCE_DECAY)
            if torch.equal(moved, self.balance):
                self.settled = True
            else:
                self.balance.copy_(moved)
        self.version = self.balance._version
        return True


_LAYER_DOC = """{summary}

Small-batch 3D training breaks every fixed normalization somewhere: BatchNorm's statistics from one
or two volumes are noise (and it raises on one sample with a 1×1×1 feature map), InstanceNorm raises
on the 1×1×1 bottleneck of a deep U-Net, GroupNorm needs channels to group. This layer runs, at each
forward, the first mode of its policy's chain whose statistics are trustworthy for the input's shape
(N samples, C channels, S spatial values), so one network trains at any batch and patch size; each
mode computes what the native module it replaces computes:

========  ======================================  =================================================
mode      statistics over                         as
========  ======================================  =================================================
batch     N·S values per channel                  ``nn.BatchNorm``, updating the running statistics
group     (C/G)·S values per sample and group     ``nn.GroupNorm(G, C)``
instance  S values per sample and channel         ``nn.InstanceNorm``
layer     C·S values per sample                   ``nn.GroupNorm(1, C)``
identity  none: γ·x + β                           the affine alone (a single value per statistic)
========  ======================================  =================================================

No mode normalizes over a single value, which would silently output β. In eval the running
statistics are used when they are learned and current (the recent training steps mostly updated
them): the layer then evaluates like ``nn.BatchNorm`` at every shape, batch 1 and 1×1×1 included.
Otherwise eval walks the chain without batch mode, whose statistics would make a prediction depend on
its batch-mates: a layer trained in a per-sample mode (group, instance) evaluates with the same
statistics, without a train/eval gap. The constructor and state dict are ``nn.BatchNorm``'s, so its
checkpoints load strictly; with ``track_running_stats=False`` the state dict is ``nn.InstanceNorm``'s
(weight, bias).

Args:
    num_features (int, optional): C, the number of channels of the input. ``None`` takes C from the
        first input, as ``nn.InstanceNorm3d(None)`` accepts any C and torch's lazy modules infer it (MONAI's
        ``ADN`` passes ``None`` without ``in_channels``); it has nothing per channel to create, so it
        implies ``affine=False`` and ``track_running_stats=False``, and asking for either raises.
    eps (float): added to the variance for numerical stability. Default: ``1e-5``
    momentum (float, optional): the running statistics' update factor, as in ``nn.BatchNorm``;
        ``None`` for a cumulative average. At batch 2 the default averages about 20 samples, so the
        eval statistics swing with every step: ``preset`` names smaller values. Default: ``0.1``
    affine (bool, optional): learn a per-channel scale γ and shift β. Default: ``True`` (``False``
        with ``num_features=None``)
    track_running_stats (bool): keep a running mean and variance, updated by batch-mode steps, for
        eval. ``False`` gives ``nn.InstanceNorm3d``'s state dict (its default), so stock InstanceNorm
        checkpoints (nnU-Net's) load strictly in both directions. Default: ``True``, as ``nn.BatchNorm``
        (``False`` with ``num_features=None``)
    device (torch.device, optional): where the parameters and buffers are created. Default: ``None``
    dtype (torch.dtype, optional): of the parameters and buffers. Default: ``None``
    bias (bool): learn β along with γ when ``affine``; ``False`` keeps the scale only. Default: ``True``
    mode (str): ``"auto"`` walks the policy's chain; ``"batch"``, ``"instance"``, ``"group"``,
        ``"layer"`` or ``"identity"`` runs that mode alone, exactly as its native module (outputs,
        gradients, running statistics), and raises ``ValueError`` where that module would compute a
        statistic over a single value. Default: ``"auto"``
    num_groups (int, optional): G for group mode; it must divide C. ``None`` takes the largest
        divisor of C up to 32 (Group Norm's default) that leaves two channels per group, so group
        mode stays distinct from instance mode; C < 4 or prime C has no group mode. Default: ``None``
    preset (str, optional): the momentum by name, for the batch size: ``"default"`` (0.1),
        ``"small_batch"`` (0.05, batch 4–8), ``"tiny_batch"`` (0.01, batch 1–3), ``"cumulative"``
        (``None``) or ``"auto"`` (about the last 256 samples, cumulative until then). Given together
        with a different ``momentum`` it raises. Default: ``None``
    policy (Policy or str, optional): auto mode's chain and thresholds: an ``adanorm.Policy``, or a
        name, since plans and configs (nnU-Net, Hydra, MONAI's norm tuples) hold plain values:
        ``"batch_group_instance"`` (``Policy()``: batch statistics from 32 samples on, then group,
        instance, layer), ``"batch_instance_group"`` (the design card's chain), ``"instance_group_layer"``
        (``nn.InstanceNorm`` wherever it can run, then group, layer, identity) or ``"group_layer"``; the
        earlier names ``"batch_first"``, ``"instance_first"`` and ``"group_first"`` still work. An unknown
        name raises and lists the names.
        Default: ``None``, ``Policy()``
    sync (bool): compute batch statistics over the ranks of ``process_group`` (one ``all_gather``
        per training forward), so every rank decides the mode from the global batch and runs the
        same one; without ``torch.distributed`` or with one process it changes nothing.
        Default: ``False``
    process_group (ProcessGroup, optional): the ranks ``sync`` gathers over. Default: ``None``, all
    renorm (bool): train batch-mode steps with Batch Renormalization (Ioffe 2017), pulling them
        toward the running statistics eval will use, so that small or non-i.i.d. batches train the
        way the layer evaluates. It needs running statistics to pull toward: with
        ``track_running_stats=False`` batch mode is plain. Default: ``False``
    renorm_r_max (float): the clip of the scale correction r to [1/r_max, r_max] once warmed up.
        Default: ``3.0``
    renorm_d_max (float): the clip of the shift correction d to [-d_max, d_max] once warmed up.
        Default: ``5.0``
    renorm_warmup_steps (int): training steps (``num_batches_tracked``) over which the limits widen
        from (1, 0), plain batch norm, to (r_max, d_max): the running statistics must be learned
        before the layer is pulled toward them. The ``renorm_*`` limits without ``renorm=True``
        raise. Default: ``10000``

Shape:
    - Input: {input_shape}
    - Output: the input's shape, dtype and memory format

Attributes:
    last_mode (str or None): the mode of the last eager forward.
    last_fallback_from (str or None): the mode the last eager forward was designed to run and fell
        back from (see ``Warns``), else ``None``; ``NormModeMonitor`` counts fallbacks from it.
    mode_counts (Dict[str, int]): eager forwards per mode: the full record, where the
        ``FallbackWarning`` is shown once per model and regime; not saved in checkpoints.
    nonfinite_skips (Tensor or None): batch-mode steps whose running-statistics update was skipped
        because the batch statistics were NaN or Inf (``Policy.skip_nonfinite``); ``None`` without
        running statistics. Copied with the buffers, not saved in checkpoints.
    running_stats_balance (Tensor or None): moves toward +1 with each training step that updated
        the running statistics and toward -1 with each per-sample one (about the last ten steps
        decide); eval uses the running statistics while it is >= 0. Loading a state dict sets it to 0.
    policy (Policy): the resolved policy.
    num_groups (int): the resolved G.

Warns:
    FallbackWarning: the spatial size left too few values per statistic for the mode the batch size
        alone would choose (a 1×1×1 bottleneck), so auto mode ran a later mode of the chain. Below
        ``min_batch_size`` samples the per-sample mode is the design and does not warn. Once per model
        and regime (from-mode, to-mode, training or eval), at the line that called the model and
        naming the layer: a network's layers fall back together.
    NonFiniteStatsWarning: the first time a running-statistics update is skipped.

Raises:
    FallbackError: instead of falling back, under ``Policy(strict=True)``.

Examples::

{examples}"""


def _layer_doc(summary: str, input_shape: str, examples: str) -> str:
    """One class's docstring: every layer class documents every argument, as ``help()`` shows only
    the class's own docstring, from the one text the classes share."""
    return _LAYER_DOC.format(summary=summary, input_shape=input_shape, examples=examples)


class AdaptiveNorm(_NormBase):
    __doc__ = _layer_doc(
        "Normalization that picks batch → group → instance → layer → identity statistics per input shape.",
        "(N, C, *), any number of spatial dimensions (the 1d/2d/3d classes check the rank as "
        "the BatchNorm class they replace does)",
        """    >>> import torch, adanorm
    >>> norm = adanorm.AdaptiveNorm(8)
    >>> norm(torch.randn(2, 8, 5)).shape  # 2 samples: per-sample statistics, 4 groups of 2 channels
    torch.Size([2, 8, 5])
    >>> norm.last_mode
    'group'""",
    )

    _input_ranks: Tuple[int, ...] = ()
    _input_layout = "(N, C, *)"

    def __init__(
        self,
        num_features: Optional[int],
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: Optional[bool] = None,
        track_running_stats: Optional[bool] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        mode: str = "auto",
        num_groups: Optional[int] = None,
        preset: Optional[str] = None,
        policy: Union[Policy, str, None] = None,
        sync: bool = False,
        process_group: Optional[Any] = None,
        renorm: bool = False,
        renorm_r_max: float = RenormLimits.r_max,
        renorm_d_max: float = RenormLimits.d_max,
        renorm_warmup_steps: int = RenormLimits.warmup_steps,
    ) -> None:
        name = type(self).__name__
        if num_features is None:
            affine, track_running_stats = _without_channel_state(name, affine, track_running_stats)
        elif isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features={num_features!r} is invalid; pass the channel count C as a positive "
                             f"integer, or None to take it from the first input.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{name}: eps={eps!r} is invalid; pass a small non-negative float such as 1e-5.")
        if mode not in MODE_CHOICES:
            raise ValueError(f"{name}: mode={mode!r} is unknown; choose one of {MODE_CHOICES}.")
        self.momentum_preset = _resolve_momentum(name, momentum, preset)
        super().__init__(
            num_features, float(eps), self.momentum_preset.momentum, True if affine is None else affine,
            True if track_running_stats is None else track_running_stats, device, dtype, bias=bias
        )
        self.mode = mode
        self.num_groups = num_groups if num_features is None else check_num_groups(num_groups, num_features)
        self.policy = Policy() if policy is None else get_policy(policy)
        self.sync = sync
        self.process_group = process_group
        self.renorm_limits = _resolve_renorm(name, renorm, renorm_r_max, renorm_d_max, renorm_warmup_steps)
        self.last_mode: Optional[str] = None
        self.last_fallback_from: Optional[str] = None
        self.mode_counts: Dict[str, int] = dict.fromkeys(MODES, 0)
        self._reported_fallbacks: Set[Tuple[str, str, bool]] = set()  # (from-mode, to-mode, training)
        self._warned_nonfinite = 0
        self._nonfinite_skips_version = 0
        self._native_spec: Optional[Tuple[type, Dict[str, Any]]] = None  # set by adanorm.convert, read by revert
        if self.track_running_stats:
            # Non-persistent buffers: the state dict keeps BatchNorm's keys, yet every copy of the
            # buffers (deepcopy, .to(), AveragedModel, EMA loops over .buffers(), DDP broadcast) carries them.
            self.register_buffer("running_stats_balance", torch.zeros((), device=device), persistent=False)
            self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        else:
            self.register_buffer("running_stats_balance", None, persistent=False)
            self.register_buffer("nonfinite_skips", None, persistent=False)
        self._eval_rule_memo = _EvalRuleMemo()
        self._eval_rule = False
        """The eval rule as the last refresh found it: what compiled code reads (it reads no buffer back)."""
        self._balance_run: Optional[_BalanceRun] = None
        self._refresh_eval_rule(self._running_stats(), recompute=True)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "running_stats_balance", None) is not None:  # None while _NormBase.__init__ runs
            self.running_stats_balance.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if self.running_stats_balance is not None:
            self.running_stats_balance.zero_()  # loaded statistics describe the loaded weights until training says otherwise
        self._refresh_eval_rule(self._running_stats(), recompute=True)

    def train(self, mode: bool = True) -> "AdaptiveNorm":
        super().train(mode)
        # eager, outside any compiled region: what a compiled eval forward reads
        self._refresh_eval_rule(self._running_stats(), recompute=True)
        self._warn_nonfinite_skips()
        return self

    def has_learned_running_stats(self) -> bool:
        """Whether eval normalizes with the running statistics (the eval rule; docs/layer.md).

        They must be tracked, learned (``num_batches_tracked > 0`` or values other than the initial
        0/1, since old checkpoints carry real statistics with a zero counter; or any values under
        ``policy.native_eval_rule``) and current: ``running_stats_balance >= 0``, i.e. the layer's
        recent training steps mostly updated them (``rules.eval_uses_running_stats``). The rule reads
        the buffers themselves, so any way they change counts (``copy_``, ``AveragedModel``,
        ``load_state_dict``, ``.to()``, a DDP broadcast); ``_EvalRuleMemo`` says when the answer is reused.
        """
        return self._current_eval_rule(torch.compiler.is_compiling(), self._running_stats())

    def _current_eval_rule(self, compiling: bool, stats: _RunningStats) -> bool:
        """The eval rule for the buffers as they are now (``stats``: ``_running_stats()``); compiled code
        reads the last refresh instead (``train()``/``eval()`` refresh it outside the graph), as it reads no
        buffer back."""
        if not compiling:
            self._refresh_eval_rule(stats)
        return self._eval_rule

    def eval_uses_running_stats(self) -> bool:
        """Whether eval normalizes every input with the running statistics, so that its output depends
        neither on batch-mates nor on how a volume is tiled (``adanorm.norm_statistics`` leaves such
        layers alone)."""
        return self._eval_reads_buffers(self.mode if self.mode != "auto" else "batch")

    def eval_statistics(self, shape: Sequence[int]) -> str:
        """What an eval forward of input of ``shape`` normalizes with: ``"running"`` (the running
        statistics), or the mode whose statistics it computes from the input itself (``"batch"``
        without running statistics, ``"instance"``, ``"group"``, ``"layer"``), or ``"identity"``.

        The eval rule in one place, for tools that treat input-dependent statistics specially
        (``adanorm.norm_statistics`` gathers them over the tiles of a volume).

        Args:
            shape (Sequence[int]): the input's (N, C, *) shape. A layer built with ``num_features=None`` that
                has not run yet takes C from it, as its forward would.
        """
        if self.num_features is None:
            self._infer_num_features(shape[1])
        plan = plan_step(tuple(shape), False, self.mode, self.policy, self.num_groups, self.track_running_stats,
                         self.running_mean is not None, self.mode == "auto" and self.has_learned_running_stats())
        if plan.uses_running_stats:
            return "running"
        return self.mode if plan.mode is None else plan.mode  # None: a forced mode that cannot run (forward raises)

    def _eval_reads_buffers(self, mode: str) -> bool:
        """Whether an eval step that runs ``mode`` normalizes with the running statistics."""
        return step_uses_running_stats(mode, self.mode, False, self.track_running_stats, self.policy.instance_running_stats,
                                       self.running_mean is not None, self.mode == "auto" and self.has_learned_running_stats())

    def _refresh_eval_rule(self, stats: _RunningStats, recompute: bool = False) -> None:
        """Bring ``_eval_rule`` up to date with the buffers (``stats``: ``_running_stats()``; ``_EvalRuleMemo``
        says when that costs a host sync). Written into ``__dict__``, as ``nn.Module.__setattr__`` would put
        it, without its type checks."""
        mean, var, steps, balance = stats
        if not self.track_running_stats or mean is None:
            self.__dict__["_eval_rule"] = False  # the rule's first test, without the call: untracked layers ask per call
            return
        if steps is None or var is None or balance is None:  # buffers set to None by hand: nothing to key on
            self.__dict__["_eval_rule"] = eval_uses_running_stats(True, self.policy.native_eval_rule, mean, var, steps, balance)
            return
        self.__dict__["_eval_rule"] = self._eval_rule_memo.answer(self.policy.native_eval_rule, steps, mean, var, balance,
                                                                  recompute)

    def _record_training_step(self, balance: Tensor, updated_running_stats: bool, captured: bool) -> None:
        """Move ``balance`` (``running_stats_balance``) toward +1 for a step that updated the running statistics,
        −1 for one that left them behind (``rules.update_balance``). Eager steps go through ``_BalanceRun``, which
        skips the updates that would change nothing; captured code runs the rule as it is."""
        if captured:
            update_balance(balance, balance_target(balance, updated_running_stats), BALANCE_DECAY)
            return
        run = self._balance_run
        if run is None or not run.step(balance, updated_running_stats):
            self.__dict__["_balance_run"] = _BalanceRun(balance, updated_running_stats)
            self._balance_run.step(balance, updated_running_stats)

    def _warn_nonfinite_skips(self) -> None:
        if self.nonfinite_skips is None or torch.compiler.is_compiling():
            return
        self._nonfinite_skips_version = self.nonfinite_skips._version
        skips = int(self.nonfinite_skips.item())
        if skips > self._warned_nonfinite:
            if not self._warned_nonfinite:
                warnings.warn(
                    f"{type(self).__name__}({self.num_features}): a batch-mode step had NaN or Inf statistics; its running-"
                    f"statistics update was skipped so the buffers stay finite (count in .nonfinite_skips). Check the input "
                    f"for NaN/Inf (under AMP, an fp16 overflow); Policy(skip_nonfinite=False) updates them as native "
                    f"BatchNorm does.",
                    NonFiniteStatsWarning,
                    stacklevel=calling_site()[0],
                )
            self._warned_nonfinite = skips

    def _check_input(self, input: Tensor, weight: Optional[Tensor]) -> None:
        """The native layers' input checks, with errors that say what to change (the layer's name is
        looked up only for a message: on a small input every lookup is a visible part of the call)."""
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(input).__name__}.")
        if not input.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} got a {input.dtype} tensor; normalization needs floating point: "
                f"convert the input with .float() (or .half()/.bfloat16())."
            )
        rank = input.dim()
        if not (rank in self._input_ranks if self._input_ranks else rank >= 2):
            raise ValueError(
                f"{type(self).__name__} expects {self._input_layout} input, got {rank}-D input of shape {tuple(input.shape)}; "
                f"use the AdaptiveNorm class that matches your data's dimensionality"
                f"{' or add the batch dimension with .unsqueeze(0)' if rank == (min(self._input_ranks or (2,)) - 1) else ''}."
            )
        if weight is not None and weight.dtype != input.dtype and not (
                weight.dtype == torch.float32 and input.dtype in _LOW_PRECISION):
            raise TypeError(
                f"{type(self).__name__}: input is {input.dtype} but the layer's parameters are {weight.dtype}; native norm "
                f"layers accept only equal dtypes or float16/bfloat16 input with float32 parameters. Convert one side "
                f"(e.g. model.to({input.dtype}) or input.to({weight.dtype})), or run under torch.autocast."
            )
        if input.shape[1] != self.num_features:
            if self.num_features is None:
                self._infer_num_features(input.shape[1])
                return
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_features} channels (num_features) at dim 1, got input of "
                f"shape {tuple(input.shape)}; set num_features to the previous layer's output channels."
            )

    def _infer_num_features(self, channels: int) -> None:
        """``num_features=None``: C (and the group count it allows) from the first input, after which the
        layer is the one ``num_features=C`` builds; it holds no per-channel tensor to create."""
        try:
            self.num_groups = check_num_groups(self.num_groups, channels)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}(num_features=None) got {channels} channels: {error}") from None
        self.num_features = channels

    def _plan(self, shape: Tuple[int, ...], compiling: bool, has_running_stats: bool, eval_rule: bool) -> StepPlan:
        """This forward's ``rules.step_plan``; raises where a forced mode cannot run, and reports a fallback."""
        training = self.training
        plan = (plan_step if compiling else _cached_plan_step)(
            shape, training, self.mode, self.policy, self.num_groups, self.track_running_stats, has_running_stats, eval_rule)
        if plan.mode is None:
            raise ValueError(
                f"{type(self).__name__}(mode={self.mode!r}) cannot normalize input of shape {tuple(shape)}: it would compute "
                f"statistics over a single value. Use mode='auto' to fall back, or a larger batch/patch size."
            )
        fallback_from = plan.fallback_from
        if fallback_from is not None and (self.policy.strict or (
                not compiling and (fallback_from, plan.mode, training) not in self._reported_fallbacks)):
            self._report_fallback(shape, fallback_from, plan.mode)
        return plan

    def _report_fallback(self, shape: Tuple[int, ...], designed: str, mode: str) -> None:
        """Raise under ``Policy(strict=True)``; otherwise warn once per model and regime (from-mode,
        to-mode, training or eval) at the line that called the model: a network's layers fall back
        together, and a warning per layer would bury the one that matters. Called only for a regime
        not yet reported, and never while compiling unless strict: warnings stay out of graphs."""
        regime = (designed, mode, self.training)
        message = (
            f"{type(self).__name__}({self.num_features}) fell back to {mode!r} mode from {designed!r} for input of "
            f"shape {tuple(shape)} in {'training' if self.training else 'eval'}: too few values per statistic for "
            f"{designed!r} mode at this shape"
        )
        if self.policy.strict:
            raise FallbackError(message + ". Policy(strict=True) forbids falling back: change the input shape or the policy.")
        self._reported_fallbacks.add(regime)
        stacklevel, model = calling_site()
        if first_report(model, regime):
            path = layer_path(model, self)
            warnings.warn(
                f"{message}{f' ({path})' if path else ''}. To keep {designed!r} mode, feed "
                f"{'more than one value per channel' if designed == 'batch' else 'a larger patch'} or use fewer "
                f"downsampling steps. Shown once per model and regime (from-mode, to-mode, training/eval); other "
                f"layers may have fallen back too: each counts its calls per mode in .mode_counts.",
                FallbackWarning,
                stacklevel=stacklevel,
            )

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` in the mode its shape allows (auto) or the forced one. The choice is
        made per call, since the batch and patch size may change between steps; eager calls record it
        in ``last_mode`` and ``mode_counts``, compiled ones fold it into the graph."""
        weight, bias = self._affine()
        self._check_input(input, weight)
        training = self.training
        global_batch = None
        if training and self.sync and (self.mode == "batch" or "batch" in self.policy.chain) and is_synced(self.process_group):
            # One gather per forward: every rank decides from the same global shape (see functional.sync).
            global_batch = gather_batch(input, self.process_group)
        compiling, captured = torch.compiler.is_compiling(), capturing()
        stats = self._running_stats()
        running_mean = stats[0]
        has_running_stats = running_mean is not None
        eval_rule = not training and self.mode == "auto" and self._current_eval_rule(compiling, stats)
        mode, fallback_from, use_buffers = self._plan(input.shape if global_batch is None else global_batch.shape,
                                                      compiling, has_running_stats, eval_rule)
        if not compiling:  # telemetry stays out of graphs: no guards on counters, no breaks
            self.__dict__["last_mode"] = mode  # plain attribute writes: skip nn.Module.__setattr__ on the hot path
            self.__dict__["last_fallback_from"] = fallback_from
            self.mode_counts[mode] += 1
        if training and self.track_running_stats and has_running_stats:
            self._record_training_step(stats[3], use_buffers, captured)
        running_mean, running_var = (running_mean, stats[1]) if use_buffers else (None, None)
        factor, renorm = 0.0, None
        if training and use_buffers:
            steps = stats[2]
            if mode == "batch" and self.renorm_limits is not None:  # the limits after the steps learned so far
                renorm = self.renorm_limits.at(steps, running_var.dtype)
            preset = self.momentum_preset
            factor = running_stats_factor(input.shape[0], steps, mode == "batch", preset.momentum, preset.window_samples or 0)
        guard = use_buffers and training and self.policy.skip_nonfinite
        nonfinite_skips = self._state("nonfinite_skips") if guard else None
        if global_batch is not None and mode == "batch":
            factors = None if renorm is None else renorm_factors(  # before the update, as adaptive_norm does
                global_batch.mean, global_batch.variance, running_mean, running_var, renorm, self.eps)
            output = synced_batch_norm(input, global_batch, weight, bias, running_mean, running_var, factor, self.eps,
                                       nonfinite_skips, self.process_group)
            return self._activate(output if factors is None else renormalize(output, factors, weight, bias))
        output = self._normalize(input, mode, weight, bias, running_mean, running_var, factor, nonfinite_skips, renorm,
                                 captured)
        if nonfinite_skips is not None and input.is_cpu and not compiling and \
                nonfinite_skips._version != self._nonfinite_skips_version:
            # Read only after the counter was written (the compiled CPU blend writes it only on a skip);
            # on GPUs the check waits for train()/eval(), to avoid a sync per step.
            self._warn_nonfinite_skips()
        return output

    def _normalize(self, input: Tensor, mode: str, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], factor: Union[float, Tensor],
                   nonfinite_skips: Optional[Tensor], renorm: Optional[RenormClip], captured: bool) -> Tensor:
        """The step's last call, given what ``forward`` decided: ``functional.api.normalize``, which a subclass
        that fuses a following operation (``AdaptiveNormAct``) replaces."""
        return normalize(input, mode, weight, bias, running_mean, running_var, self.training, factor, self.eps,
                         self.num_groups, nonfinite_skips, renorm, captured)

    def _activate(self, output: Tensor) -> Tensor:
        """What follows a step that ``_normalize`` does not run (synced batch statistics): nothing here."""
        return output

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles ``adanorm.scripting.ScriptableAdaptiveNorm`` in place of this layer."""
        return ScriptableAdaptiveNorm(self)

    def _affine(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """``(weight, bias)`` as ``_state`` reads them, with one lookup of ``_parameters`` for both."""
        parameters = self._parameters
        try:
            return parameters["weight"], parameters["bias"]
        except KeyError:  # moved out by parametrize or weight norm
            return self._state("weight"), self._state("bias")

    def _running_stats(self) -> _RunningStats:
        """``(running_mean, running_var, num_batches_tracked, running_stats_balance)`` as ``_state`` reads
        them, with one lookup of ``_buffers`` for all four (each is ``None`` where it is not tracked)."""
        buffers = self._buffers
        try:
            return (buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"],
                    buffers["running_stats_balance"])
        except KeyError:  # moved out by parametrize
            return (self._state("running_mean"), self._state("running_var"), self._state("num_batches_tracked"),
                    self._state("running_stats_balance"))

    def _state(self, name: str) -> Optional[Tensor]:
        """``getattr(self, name)`` for a parameter or buffer, read from ``_parameters``/``_buffers``
        directly rather than through ``nn.Module.__getattr__`` (per-call cost: BENCHMARKS.md).

        Invariant: normal attribute lookup would return the same object. ``nn.Module.__setattr__`` keeps a
        name in at most one of ``__dict__``, ``_parameters`` and ``_buffers``, and whatever replaces a
        parameter with a computed attribute (``torch.nn.utils.parametrize``, weight norm) removes the name
        from ``_parameters``; so a name found in these dicts is the attribute, and any other name takes the
        normal lookup."""
        tensors = self._parameters
        if name not in tensors:
            tensors = self._buffers
            if name not in tensors:
                return getattr(self, name)
        return tensors[name]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mode={self.mode}, num_groups={self.num_groups}, "
            f"preset={self.momentum_preset.name}{', sync=True' if self.sync else ''}{_renorm_repr(self.renorm_limits)}"
        )


def _without_channel_state(name: str, affine: Optional[bool], track_running_stats: Optional[bool]) -> Tuple[bool, bool]:
    """``num_features=None`` creates nothing per channel: ``affine`` and ``track_running_stats`` must be unset
    or ``False``; native norms fail there with a TypeError from ``torch.empty(None)``."""
    requested = [arg for arg, value in (("affine", affine), ("track_running_stats", track_running_stats)) if value]
    if requested:
        raise ValueError(
            f"{name}(num_features=None, {', '.join(f'{arg}=True' for arg in requested)}): the channel count is needed to "
            f"create per-channel {' and '.join(requested)} state; pass num_features=C, or leave {' and '.join(requested)} "
            f"unset (False) to take C from the first input.")
    return False, False


def _resolve_renorm(name: str, renorm: bool, r_max: float, d_max: float, warmup_steps: int) -> Optional[RenormLimits]:
    """The limits of a renorm layer; limits given without ``renorm=True`` are an error, not silently
    ignored (a YAML config that sets them but forgot the switch would train plain batch norm)."""
    if not isinstance(renorm, bool):
        raise TypeError(f"{name}: renorm={renorm!r} must be True or False.")
    try:
        limits = RenormLimits(r_max, d_max, warmup_steps)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if not renorm and limits != RenormLimits():
        raise ValueError(f"{name}: {limits} has no effect without renorm=True; pass renorm=True or drop the renorm_* arguments.")
    return limits if renorm else None


def _renorm_repr(limits: Optional[RenormLimits]) -> str:
    if limits is None:
        return ""
    return f", renorm=True, renorm_r_max={limits.r_max}, renorm_d_max={limits.d_max}, renorm_warmup_steps={limits.warmup_steps}"


def _resolve_momentum(name: str, momentum: Optional[float], preset: Optional[str]) -> MomentumPreset:
    if preset is not None:
        if not isinstance(preset, str):
            raise ValueError(f"{name}: preset={preset!r} must be a preset name such as 'small_batch'.")
        if momentum not in (0.1, None) and momentum != get_preset(preset).momentum:
            raise ValueError(f"{name}: momentum={momentum!r} conflicts with preset={preset!r}; pass one or the other.")
        return get_preset(preset)
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(
            f"{name}: momentum={momentum!r} is invalid; use a float in [0, 1], None for a cumulative average, or preset=.")
    if momentum is None:
        return get_preset("cumulative")
    return MomentumPreset("default" if momentum == 0.1 else "custom", float(momentum))


class AdaptiveNorm1d(AdaptiveNorm):
    __doc__ = _layer_doc(
        "Drop-in for ``nn.BatchNorm1d`` and ``nn.InstanceNorm1d`` on (N, C) or (N, C, L) input.",
        "(N, C) or (N, C, L)",
        """    >>> import torch, adanorm
    >>> norm = adanorm.AdaptiveNorm1d(8)
    >>> _ = norm(torch.randn(32, 8))  # 32 samples: batch statistics
    >>> norm.last_mode
    'batch'
    >>> _ = norm(torch.randn(2, 8))  # 2 samples of one value per channel: one statistic over the channels
    >>> norm.last_mode
    'layer'""",
    )

    _input_ranks = (2, 3)
    _input_layout = "(N, C) or (N, C, L)"


class AdaptiveNorm2d(AdaptiveNorm):
    __doc__ = _layer_doc(
        "Drop-in for ``nn.BatchNorm2d`` and ``nn.InstanceNorm2d`` on (N, C, H, W) input.",
        "(N, C, H, W)",
        """    >>> import torch, adanorm
    >>> norm = adanorm.AdaptiveNorm2d(3)
    >>> _ = norm(torch.randn(4, 3, 32, 32))  # 4 samples, 3 channels (no groups): instance statistics
    >>> norm.last_mode
    'instance'""",
    )

    _input_ranks = (4,)
    _input_layout = "(N, C, H, W)"


class AdaptiveNorm3d(AdaptiveNorm):
    __doc__ = _layer_doc(
        "Drop-in for ``nn.BatchNorm3d``, ``nn.InstanceNorm3d`` and ``nn.GroupNorm`` on (N, C, D, H, W) volumes.",
        "(N, C, D, H, W)",
        """    >>> import torch, adanorm
    >>> norm = adanorm.AdaptiveNorm3d(16)
    >>> norm(torch.randn(32, 16, 4, 4, 4)).shape  # 32 samples: batch statistics, as nn.BatchNorm3d
    torch.Size([32, 16, 4, 4, 4])
    >>> _ = norm(torch.randn(2, 16, 4, 4, 4))  # 2 samples: group statistics, 8 groups of 2 channels
    >>> norm.last_mode, norm.mode_counts["batch"], norm.mode_counts["group"]
    ('group', 1, 1)

    nnU-Net's InstanceNorm3d (in its plans: ``"norm_op": "adanorm.AdaptiveNorm3d"`` with these
    ``norm_op_kwargs``), which also trains on a 1×1×1 bottleneck:

    >>> bottleneck = adanorm.AdaptiveNorm3d(32, eps=1e-5, affine=True, track_running_stats=False,
    ...                                     policy="instance_group_layer")
    >>> _ = bottleneck(torch.randn(2, 32, 1, 1, 1))  # nn.InstanceNorm3d raises here
    >>> bottleneck.last_mode
    'group'
    >>> sorted(bottleneck.state_dict())  # nn.InstanceNorm3d's checkpoint layout
    ['bias', 'weight']""",
    )

    _input_ranks = (5,)
    _input_layout = "(N, C, D, H, W)"
