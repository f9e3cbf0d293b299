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
from adanorm.functional.renorm import RenormLimits, renorm_factors, renormalize
from adanorm.functional.sync import gather_batch, is_synced, synced_batch_norm
from adanorm.policy import (
    MODES,
    FallbackError,
    FallbackWarning,
    NonFiniteStatsWarning,
    Policy,
    check_num_groups,
    choose_mode,
    designed_mode,
    get_policy,
    is_fallback,
    mode_is_usable,
)
from adanorm.presets import MomentumPreset, get_preset
from adanorm.scripting import ScriptableAdaptiveNorm
from adanorm.warning_site import calling_site, first_report, layer_path

MODE_CHOICES = ("auto",) + MODES
_LOW_PRECISION = (torch.float16, torch.bfloat16)
BALANCE_DECAY = 0.9
"""Weight of the past in ``running_stats_balance``: about the last ten training steps decide."""
BALANCE_CHECK_STEPS = 64
"""Steps in one direction between checks of whether the balance has reached its update's fixed point."""


def auto_decision(shape: Tuple[int, ...], training: bool, policy: Policy, num_groups: int,
                  has_running_stats: bool) -> Tuple[str, Optional[str]]:
    """Auto mode's choice for one input: the mode, and the ``designed_mode`` where that mode is a
    fallback from it (else ``None``). The policy's pure functions, composed once so that the eager
    hot path asks one cache per call (``_cached_auto_decision``, keyed on the shape, whose batch size
    the designed mode depends on); compiled code calls this uncached: dynamo folds it into the graph
    and would warn about a cache it bypasses."""
    mode = choose_mode(shape, training, policy, num_groups, has_running_stats)
    if not is_fallback(mode, shape, training, policy, has_running_stats, num_groups):
        return mode, None
    return mode, designed_mode(shape, training, policy, num_groups)


_cached_auto_decision = lru_cache(maxsize=4096)(auto_decision)
_cached_mode_is_usable = lru_cache(maxsize=4096)(mode_is_usable)


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
    num_features (int): C, the number of channels of the input.
    eps (float): added to the variance for numerical stability. Default: ``1e-5``
    momentum (float, optional): the running statistics' update factor, as in ``nn.BatchNorm``;
        ``None`` for a cumulative average. At batch 2 the default averages about 20 samples, so the
        eval statistics swing with every step: ``preset`` names smaller values. Default: ``0.1``
    affine (bool): learn a per-channel scale γ and shift β. Default: ``True``
    track_running_stats (bool): keep a running mean and variance, updated by batch-mode steps, for
        eval. ``False`` gives ``nn.InstanceNorm3d``'s state dict (its default), so stock InstanceNorm
        checkpoints (nnU-Net's) load strictly in both directions. Default: ``True``, as ``nn.BatchNorm``
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
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
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
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features={num_features!r} is invalid; pass the channel count C as a positive integer.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{name}: eps={eps!r} is invalid; pass a small non-negative float such as 1e-5.")
        if mode not in MODE_CHOICES:
            raise ValueError(f"{name}: mode={mode!r} is unknown; choose one of {MODE_CHOICES}.")
        self.momentum_preset = _resolve_momentum(name, momentum, preset)
        super().__init__(
            num_features, float(eps), self.momentum_preset.momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.mode = mode
        self.num_groups = check_num_groups(num_groups, num_features)
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
        self._eval_rule_key: Tuple[int, ...] = ()
        self._eval_rule = False
        self._refresh_eval_rule()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "running_stats_balance", None) is not None:  # None while _NormBase.__init__ runs
            self.running_stats_balance.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if self.running_stats_balance is not None:
            self.running_stats_balance.zero_()  # loaded statistics describe the loaded weights until training says otherwise
        self._refresh_eval_rule()

    def train(self, mode: bool = True) -> "AdaptiveNorm":
        super().train(mode)
        self._refresh_eval_rule()  # eager, outside any compiled region: what a compiled eval forward reads
        self._warn_nonfinite_skips()
        return self

    def has_learned_running_stats(self) -> bool:
        """Whether eval normalizes with the running statistics (the eval rule; see the README).

        They must be tracked, learned (``num_batches_tracked > 0`` or values other than the initial
        0/1, since old checkpoints carry real statistics with a zero counter; or any values under
        ``policy.native_eval_rule``) and current: ``running_stats_balance >= 0``, i.e. the layer's
        recent training steps mostly updated them. The rule reads the buffers themselves, so any way
        they change counts (``copy_``, ``AveragedModel``, ``load_state_dict``, ``.to()``, a DDP
        broadcast); the answer is cached against the buffers' version counters and recomputed (one
        host sync) only after a write.
        """
        if not torch.compiler.is_compiling():
            self._refresh_eval_rule()
        return self._eval_rule

    def eval_uses_running_stats(self) -> bool:
        """Whether eval normalizes every input with the running statistics, so that its output depends
        neither on batch-mates nor on how a volume is tiled (``adanorm.norm_statistics`` leaves such
        layers alone)."""
        return self.has_learned_running_stats() if self.mode == "auto" else self._eval_reads_buffers(self.mode)

    def eval_statistics(self, shape: Sequence[int]) -> str:
        """What an eval forward of input of ``shape`` normalizes with: ``"running"`` (the running
        statistics), or the mode whose statistics it computes from the input itself (``"batch"``
        without running statistics, ``"instance"``, ``"group"``, ``"layer"``), or ``"identity"``.

        The eval rule in one place, for tools that treat input-dependent statistics specially
        (``adanorm.norm_statistics`` gathers them over the tiles of a volume).

        Args:
            shape (Sequence[int]): the input's (N, C, *) shape.
        """
        mode = self.mode if self.mode != "auto" else choose_mode(
            tuple(shape), False, self.policy, self.num_groups, self.has_learned_running_stats())
        return "running" if self._eval_reads_buffers(mode) else mode

    def _eval_reads_buffers(self, mode: str) -> bool:
        if self.mode == "auto":
            return mode == "batch" and self._eval_rule
        # Forced modes read the buffers in eval as the native module does, kept even while tracking is off.
        return self.running_mean is not None and (
            mode == "batch" or (mode == "instance" and self.policy.instance_running_stats))

    def _refresh_eval_rule(self) -> None:
        mean = self._state("running_mean")
        if not self.track_running_stats or mean is None:
            self._eval_rule_key, self._eval_rule = (), False
            return
        # Read on every eval call, so spelled out: four attribute lookups and a generator cost as much as
        # a small layer's kernel.
        steps, var, balance = (self._state("num_batches_tracked"), self._state("running_var"),
                               self._state("running_stats_balance"))
        key = (id(steps), steps._version, id(mean), mean._version, id(var), var._version, id(balance), balance._version)
        if key == self._eval_rule_key:
            return
        current = bool(balance.item() >= 0)
        learned = self.policy.native_eval_rule or bool(steps.item() > 0 or mean.ne(0).any().item() or var.ne(1).any().item())
        self._eval_rule_key, self._eval_rule = key, current and learned

    def _record_training_step(self, updated_running_stats: bool, captured: bool) -> None:
        """Move the balance toward +1 for a step that updated the running statistics, −1 for one that
        left them behind (a per-sample mode), weighting the last ~10 steps (``BALANCE_DECAY``).

        One step decides after a load; a run of about seven steps decides after long training in the
        other regime. So a smaller last batch per epoch does not switch a batch-trained layer's eval
        to per-sample statistics, while fine-tuning that really moved to a per-sample mode does.

        In eager mode the update (a few µs, as much as a small layer's kernel) stops once the balance
        sits at its fixed point: after a long run in one direction the rounded update leaves it
        unchanged, which a check every ``BALANCE_CHECK_STEPS`` steps finds by computing it. From then
        on the skipped writes are exactly those a ``lerp_`` would make, until a write from elsewhere
        (its version counter: a load, a copy, a reset) or a step in the other direction.
        """
        balance = self._state("running_stats_balance")
        target = 1.0 if updated_running_stats else -1.0
        if captured:  # no cached constant in a graph: the tracer would record its first creation
            balance.mul_(BALANCE_DECAY).add_((1.0 - BALANCE_DECAY) * target)
            return
        run = self.__dict__.get("_balance_run")  # (buffer, its version after our last write, target, steps)
        steps = run[3] if run is not None and run[0] is balance and run[1] == balance._version and run[2] == target else 0
        if steps < 0:
            return  # at the fixed point of this direction's update
        steps += 1
        end = _balance_target(target, balance.device, balance.dtype)
        if steps % BALANCE_CHECK_STEPS:
            balance.lerp_(end, 1.0 - BALANCE_DECAY)
        else:
            moved = torch.lerp(balance, end, 1.0 - BALANCE_DECAY)
            if torch.equal(moved, balance):
                steps = -1
            else:
                balance.copy_(moved)
        self.__dict__["_balance_run"] = (balance, balance._version, target, steps)

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
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_features} channels (num_features) at dim 1, got input of "
                f"shape {tuple(input.shape)}; set num_features to the previous layer's output channels."
            )

    def _select_mode(self, shape: Tuple[int, ...], compiling: bool) -> Tuple[str, Optional[str]]:
        """The mode for ``shape``, and the designed mode it fell back from (else ``None``)."""
        training = self.training
        if self.mode != "auto":
            usable = (mode_is_usable if compiling else _cached_mode_is_usable)(self.mode, shape, self.num_groups, None)
            uses_running_stats = self.mode == "batch" and not training and self._state("running_mean") is not None
            if not (usable or uses_running_stats):
                raise ValueError(
                    f"{type(self).__name__}(mode={self.mode!r}) cannot normalize input of shape {tuple(shape)}: it would compute "
                    f"statistics over a single value. Use mode='auto' to fall back, or a larger batch/patch size."
                )
            return self.mode, None
        has_stats = not training and self.has_learned_running_stats()
        mode, fallback_from = (auto_decision if compiling else _cached_auto_decision)(
            shape, training, self.policy, self.num_groups, has_stats)
        if fallback_from is not None and (self.policy.strict or (
                not compiling and (fallback_from, mode, training) not in self._reported_fallbacks)):
            self._report_fallback(shape, fallback_from, mode)
        return mode, fallback_from

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
        weight, bias = self._state("weight"), self._state("bias")
        self._check_input(input, weight)
        training = self.training
        global_batch = None
        if training and self.sync and (self.mode == "batch" or "batch" in self.policy.chain) and is_synced(self.process_group):
            # One gather per forward: every rank decides from the same global shape (see functional.sync).
            global_batch = gather_batch(input, self.process_group)
        compiling, captured = torch.compiler.is_compiling(), capturing()
        mode, fallback_from = self._select_mode(input.shape if global_batch is None else global_batch.shape, compiling)
        if not compiling:  # telemetry stays out of graphs: no guards on counters, no breaks
            self.__dict__["last_mode"] = mode  # plain attribute writes: skip nn.Module.__setattr__ on the hot path
            self.__dict__["last_fallback_from"] = fallback_from
            self.mode_counts[mode] += 1
        running_mean = self._state("running_mean")
        if training:
            use_buffers = self.track_running_stats and (
                mode == "batch" or (mode == "instance" and self.policy.instance_running_stats))
            if self.track_running_stats and running_mean is not None:
                self._record_training_step(use_buffers, captured)
        else:
            use_buffers = self._eval_reads_buffers(mode)
        running_mean, running_var = (running_mean, self._state("running_var")) if use_buffers else (None, None)
        factor, renorm = 0.0, None
        if training and use_buffers:
            if mode == "batch" and self.renorm_limits is not None:  # the limits after the steps learned so far
                renorm = self.renorm_limits.at(self._state("num_batches_tracked"), running_var.dtype)
            factor = self._update_factor(input.shape[0], count_step=mode == "batch")
        guard = use_buffers and training and self.policy.skip_nonfinite
        nonfinite_skips = self._state("nonfinite_skips") if guard else None
        if global_batch is not None and mode == "batch":
            factors = None if renorm is None else renorm_factors(  # before the update, as adaptive_norm does
                global_batch.mean, global_batch.variance, running_mean, running_var, renorm, self.eps)
            output = synced_batch_norm(input, global_batch, weight, bias, running_mean, running_var, factor, self.eps,
                                       nonfinite_skips, self.process_group)
            return output if factors is None else renormalize(output, factors, weight, bias)
        output = normalize(input, mode, weight, bias, running_mean, running_var, training, factor, self.eps,
                           self.num_groups, nonfinite_skips, renorm, captured)
        if nonfinite_skips is not None and input.is_cpu and not compiling and \
                nonfinite_skips._version != self._nonfinite_skips_version:
            # Read only after the counter was written (the compiled CPU blend writes it only on a skip);
            # on GPUs the check waits for train()/eval(), to avoid a sync per step.
            self._warn_nonfinite_skips()
        return output

    def _update_factor(self, batch_size: int, count_step: bool) -> Union[float, Tensor]:
        """This step's running-statistics factor. Batch steps count in ``num_batches_tracked`` as in
        nn.BatchNorm; instance steps do not, as in nn.InstanceNorm."""
        num_batches_tracked = self._state("num_batches_tracked")
        if count_step:
            num_batches_tracked.add_(1)
        return self.momentum_preset.factor(batch_size, num_batches_tracked)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles ``adanorm.scripting.ScriptableAdaptiveNorm`` in place of this layer."""
        return ScriptableAdaptiveNorm(self)

    def _state(self, name: str) -> Optional[Tensor]:
        """A parameter or buffer at the cost of a dict lookup: ``nn.Module.__getattr__`` takes about a
        microsecond per name, a tenth of a small layer's call. Names moved out of these dicts (weight
        norm, ``torch.nn.utils.parametrize``) take the normal attribute lookup."""
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


@lru_cache(maxsize=None)
def _balance_target(target: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(target, device=device, dtype=dtype)


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
