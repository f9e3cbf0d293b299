"""The fallback policy: which normalization mode a layer can use for a given input shape.

Kept as pure functions of (shape, training, settings, layer state) so the choice can be
tested and reasoned about without running a layer; the layers cache them per shape on the eager
hot path, and compilers trace them, folding the choice into the graph for the shapes they see.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple, Union

MODES: Tuple[str, ...] = ("batch", "instance", "group", "layer", "identity")
"""Every mode. Telemetry (``mode_counts``, the Lightning monitor) lists modes in this order, and
``native_first`` slices it, so a chain that starts at instance mode falls back instance → group → layer →
identity. The default chain is ``DEFAULT_CHAIN``, which tries group before instance."""

DEFAULT_CHAIN: Tuple[str, ...] = ("batch", "group", "instance", "layer", "identity")
"""``Policy().chain``: batch statistics from ``min_batch_size`` samples on, then group, instance, layer,
identity. Group comes before instance because group norm trained better than instance norm in the
small-batch study (STUDY.md, issue #13; ``Policy`` says more). With the default thresholds instance mode
then runs only in layers without group mode (one group: C < 4, prime C, or ``num_groups=1``): a group
pools (C/G)·S ≥ S values, so wherever instance statistics are usable, group statistics are too."""

DEFAULT_MIN_BATCH_SIZE = 32
"""``Policy().min_batch_size``: the samples batch mode needs by default (``Policy`` says why 32)."""

MIN_VALUES_PER_STATISTIC = 2
"""A mean/variance over a single value is degenerate (the output would silently be β)."""

DEFAULT_MAX_GROUPS = 32
"""Group Norm's default group count (Wu & He 2018), used when the user gives none."""


class FallbackError(RuntimeError):
    """Raised instead of falling back when ``Policy(strict=True)``."""


class FallbackWarning(UserWarning):
    """Emitted when the spatial size forces auto mode past the mode the batch size alone would choose
    (``designed_mode``), e.g. on a 1×1×1 bottleneck: once per model and regime (the from-mode, the
    to-mode, training or eval), pointing at the line that called the model. Per-sample statistics below
    ``min_batch_size`` samples are the design and do not warn."""


class NonFiniteStatsWarning(RuntimeWarning):
    """Emitted once per layer, the first time a running-statistics update is skipped for NaN/Inf statistics."""


@dataclass(frozen=True)
class Policy:
    """Thresholds that decide when each mode's statistics are trustworthy enough to use.

    A mode's statistics can be computed from two values, but not trusted: batch statistics from a
    few samples are what makes BatchNorm lose to per-sample norms at small batch, and instance
    statistics over a handful of voxels are mostly noise. Auto mode walks ``chain`` and runs the first
    mode whose statistics clear its threshold. Configurations that hold plain values name a policy
    instead (``NAMED_POLICIES``: ``"instance_group_layer"`` ...).

    The default (batch statistics from 32 samples, then group, then instance) is what trained best in
    the small-batch study; STUDY.md has the evidence and docs/layer.md the reasoning. Group before
    instance also means fewer per-sample statistics, each over more values, so group mode stays usable
    in bottlenecks too small for instance mode.

    Args:
        chain (Tuple[str, ...]): the fallback order, a non-empty ordered subset of ``MODES``.
            Converted InstanceNorm and GroupNorm layers start it later, so that they keep their native
            behaviour wherever the native layer can run. Default: ``DEFAULT_CHAIN``, batch → group →
            instance → layer → identity
        min_batch_size (int): samples batch mode needs. Default: ``32`` (``DEFAULT_MIN_BATCH_SIZE``)
        min_instance_size (int): spatial values per sample and channel instance mode needs. Default: ``4``
        min_group_size (int): values per sample and group group mode needs. Default: ``4``
        strict (bool): raise ``FallbackError`` instead of falling back from the ``designed_mode``
            (the mode the batch size alone would choose), for runs that must not silently change their
            normalization. Default: ``False``
        skip_nonfinite (bool): skip a running-statistics update whose statistics are NaN or Inf (one
            bad batch, an fp16 overflow under AMP) instead of poisoning the buffers for good, as native
            BatchNorm does. Default: ``True``
        native_eval_rule (bool): use the running statistics in eval even while they hold their initial
            mean 0 / variance 1, as native BatchNorm/InstanceNorm(track_running_stats=True) do;
            ``convert`` sets it. Otherwise untrained statistics are ignored, since normalizing with 0/1
            is no normalization. Default: ``False``
        eval_batch_stats (bool): without usable running statistics, normalize eval batches with batch
            statistics, as BatchNorm(track_running_stats=False) does; off by default because they mix
            the samples of an inference batch, so a prediction would depend on its batch-mates.
            Default: ``False``
        instance_running_stats (bool): instance-mode training steps update the running statistics
            with the batch's average instance statistics, as InstanceNorm(track_running_stats=True)
            does, so eval uses them. Default: ``False``

    Example:
        >>> import adanorm
        >>> shape = (2, 32, 4, 4, 4)  # nnU-Net's batch of 2
        >>> adanorm.choose_mode(shape, True, adanorm.Policy(), num_groups=16, has_running_stats=False)
        'group'
        >>> adanorm.choose_mode(shape, True, "instance_group_layer", num_groups=16, has_running_stats=False)
        'instance'
        >>> adanorm.choose_mode(shape, True, adanorm.Policy(min_batch_size=2), num_groups=16, has_running_stats=False)
        'batch'
    """

    chain: Tuple[str, ...] = DEFAULT_CHAIN
    min_batch_size: int = DEFAULT_MIN_BATCH_SIZE
    min_instance_size: int = 4
    min_group_size: int = 4
    strict: bool = False
    skip_nonfinite: bool = True
    native_eval_rule: bool = False
    eval_batch_stats: bool = False
    instance_running_stats: bool = False

    def __post_init__(self) -> None:
        chain = tuple(self.chain)
        object.__setattr__(self, "chain", chain)
        unknown = [m for m in chain if m not in MODES]
        if not chain or unknown:
            raise ValueError(
                f"Policy.chain={chain!r} contains unknown modes {unknown}; "
                f"use a non-empty ordered subset of {MODES}."
            )
        if len(set(chain)) != len(chain):
            raise ValueError(f"Policy.chain={chain!r} repeats a mode; list each mode at most once.")
        for name in ("min_batch_size", "min_instance_size", "min_group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Policy.{name}={value!r} is invalid; use an integer >= 1.")


def native_first(mode: str, base: Optional[Policy] = None) -> Policy:
    """``base`` (default ``Policy()``) with the chain starting at the per-sample ``mode`` and its
    thresholds at the native floor: the layer normalizes as ``nn.InstanceNorm``/``nn.GroupNorm`` do
    wherever they can run, and falls back only where they would raise (a 1×1×1 bottleneck)."""
    return replace(
        base or Policy(),
        chain=MODES[MODES.index(mode):],
        min_instance_size=MIN_VALUES_PER_STATISTIC,
        min_group_size=MIN_VALUES_PER_STATISTIC,
    )


DESIGN_CARD_CHAIN: Tuple[str, ...] = MODES
"""The design card's chain, batch → instance → group → layer → identity (``"batch_instance_group"``)."""

NAMED_POLICIES: Dict[str, Policy] = {
    "batch_group_instance": Policy(),
    "batch_instance_group": Policy(chain=DESIGN_CARD_CHAIN),
    "instance_group_layer": native_first("instance"),
    "group_layer": native_first("group"),
}
"""Policies by the chain they walk, for configurations that hold plain values (nnU-Net plans, Hydra YAML,
MONAI's ``("adaptive", {...})`` norm tuples). ``"batch_group_instance"`` is ``Policy()``;
``"batch_instance_group"`` is the design card's chain with the default thresholds; ``"instance_group_layer"``
and ``"group_layer"`` start at a per-sample mode with the native floor as threshold, the drop-ins for
``nn.InstanceNorm`` and ``nn.GroupNorm``."""

POLICY_ALIASES: Dict[str, str] = {
    "batch_first": "batch_group_instance",
    "instance_first": "instance_group_layer",
    "group_first": "group_layer",
}
"""Earlier names of ``NAMED_POLICIES``' entries, still accepted: configurations and checkpoints hold them."""


def get_policy(policy: Union[Policy, str]) -> Policy:
    """A ``Policy`` as given, or the one ``NAMED_POLICIES`` holds under that name.

    Args:
        policy (Policy or str): a policy, or one of ``NAMED_POLICIES``' names (or ``POLICY_ALIASES``').

    Returns:
        Policy: the policy.

    Raises:
        ValueError: for an unknown name, listing the known ones.
        TypeError: for anything but a ``Policy`` or a string.

    Example:
        >>> import adanorm
        >>> adanorm.get_policy("instance_group_layer").chain
        ('instance', 'group', 'layer', 'identity')
        >>> adanorm.get_policy("batch_instance_group").chain  # the design card's chain
        ('batch', 'instance', 'group', 'layer', 'identity')
    """
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(
            f"policy must be an adanorm.Policy or one of the names {sorted(NAMED_POLICIES)}, got "
            f"{type(policy).__name__}; build one with adanorm.Policy(...)."
        )
    name = POLICY_ALIASES.get(policy, policy)
    if name not in NAMED_POLICIES:
        raise ValueError(f"policy={policy!r} is unknown; choose one of {sorted(NAMED_POLICIES)} or pass an adanorm.Policy(...).")
    return NAMED_POLICIES[name]


def default_num_groups(num_channels: int, max_groups: int = DEFAULT_MAX_GROUPS) -> int:
    """The largest divisor of C that is at most ``max_groups`` (Group Norm's default, 32) and leaves at
    least two channels per group, so that group mode stays distinct from instance mode.
    Returns 1 (no usable grouping) for C < 4 or prime C. TorchScript compiles it too.
    """
    for groups in range(min(max_groups, num_channels // 2), 1, -1):
        if num_channels % groups == 0:
            return groups
    return 1


def check_num_groups(num_groups: Optional[int], num_channels: int) -> int:
    """Resolve the group count for C channels, rejecting a user value that cannot split C."""
    if num_groups is None:
        return default_num_groups(num_channels)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups={num_groups!r} is invalid; pass a positive integer that divides num_features.")
    if num_channels % num_groups:
        divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise ValueError(
            f"num_groups={num_groups} does not divide num_features={num_channels}; "
            f"choose one of {divisors} or leave num_groups=None for the default."
        )
    return num_groups


def mode_is_usable(mode: str, shape: Tuple[int, ...], num_groups: int, policy: Optional[Policy]) -> bool:
    """Whether ``mode`` has enough values per statistic for ``shape``.

    With ``policy=None`` only the hard floor applies (more than one value per statistic): that is
    where the native PyTorch layer would raise, and it is what forced modes check.
    """
    if policy is None:
        return usable(mode, list(shape), num_groups, True, 1, MIN_VALUES_PER_STATISTIC, MIN_VALUES_PER_STATISTIC)
    return usable(mode, list(shape), num_groups, False, policy.min_batch_size, policy.min_instance_size, policy.min_group_size)


def choose_mode(
    shape: Tuple[int, ...],
    training: bool,
    policy: Union[Policy, str],
    num_groups: int,
    has_running_stats: bool,
) -> str:
    """The mode auto mode runs for this input: a pure function, so the choice can be tested and
    reasoned about without running a layer.

    In eval, usable running statistics win: they are valid at every shape, including batch 1 and
    1×1×1. Without them, batch mode is skipped in eval (its statistics would mix the samples of an
    inference batch) unless ``policy.eval_batch_stats``, and the rest of the chain is walked as in
    training.

    Args:
        shape (Tuple[int, ...]): the input's shape, (N, C, *).
        training (bool): whether the layer is in training mode.
        policy (Policy or str): the thresholds, or a ``NAMED_POLICIES`` name.
        num_groups (int): G for group mode (1: no group mode).
        has_running_stats (bool): whether eval would use the running statistics (a layer's
            ``has_learned_running_stats()``).

    Returns:
        str: one of ``MODES``.

    Example:
        >>> import adanorm
        >>> adanorm.choose_mode((2, 32, 1, 1, 1), True, "instance_group_layer", num_groups=16, has_running_stats=False)
        'group'
    """
    policy = get_policy(policy)
    return choose(list(shape), training, candidates(training, list(policy.chain), policy.eval_batch_stats),
                  num_groups, policy.min_batch_size, policy.min_instance_size, policy.min_group_size, has_running_stats)


def designed_mode(shape: Tuple[int, ...], training: bool, policy: Policy, num_groups: int) -> str:
    """The mode the batch size alone would choose: what the layer is meant to run for this shape.

    Below ``min_batch_size`` samples the chain's per-sample mode is the design (``Policy`` says why),
    and a layer with one group (C < 4 or prime C by default) has no group mode at any shape; only the
    spatial size can then force a later mode, and that is a fallback (``is_fallback``).

    Args:
        shape (Tuple[int, ...]): the input's shape, (N, C, *).
        training (bool): whether the layer is in training mode.
        policy (Policy): the chain and thresholds.
        num_groups (int): G for group mode (1: no group mode).

    Returns:
        str: one of ``MODES``.

    Example:
        >>> import adanorm
        >>> from adanorm.policy import designed_mode
        >>> designed_mode((1, 64, 1, 1, 1), True, adanorm.Policy(), num_groups=32)  # group, though 1x1x1 forces layer
        'group'
    """
    walked = candidates(training, list(policy.chain), policy.eval_batch_stats)
    return designed(walked, shape[0], num_groups, policy.min_batch_size)


def is_fallback(mode: str, shape: Tuple[int, ...], training: bool, policy: Policy, has_running_stats: bool,
                num_groups: int) -> bool:
    """Whether auto mode running ``mode`` for ``shape`` is a fallback: a mode other than the
    ``designed_mode``, which the input's spatial size left too few values per statistic. Never in
    eval with usable running statistics, which are valid at every shape."""
    walked = candidates(training, list(policy.chain), policy.eval_batch_stats)
    return fallback_from(mode, training, has_running_stats, walked, shape[0], num_groups, policy.min_batch_size) is not None


# The decision itself, over plain values so that TorchScript compiles the same code the eager layers run
# (``adanorm.scripting``): no Policy object, no math.prod, lists instead of tuples.

def candidates(training: bool, chain: List[str], eval_batch_stats: bool) -> List[str]:
    """The chain auto mode walks: without usable running statistics, eval skips batch mode unless told not to."""
    if training or eval_batch_stats:
        return chain
    walked: List[str] = []
    for mode in chain:  # a loop: TorchScript has no filtered comprehensions
        if mode != "batch":
            walked.append(mode)
    return walked


def designed(walked: List[str], batch_size: int, num_groups: int, min_batch_size: int) -> str:
    """``designed_mode`` over plain values: the first of the ``candidates`` that the batch size and the
    layer allow (batch mode from ``min_batch_size`` samples, group mode with more than one group).
    A chain that has no mode for this batch size (``chain=("batch",)``) is designed to run batch mode,
    so that what auto mode runs instead counts as a fallback."""
    unserved = "identity"
    for mode in walked:
        if mode == "group" and num_groups == 1:
            continue
        if mode != "batch" or batch_size >= min_batch_size:
            return mode
        unserved = mode
    return unserved


def usable(mode: str, shape: List[int], num_groups: int, forced: bool, min_batch_size: int,
           min_instance_size: int, min_group_size: int) -> bool:
    """``mode_is_usable`` over plain values.

    ``forced`` applies only the hard floor: anything but a statistic over exactly one value, which
    would silently output β (so an empty batch passes through batch mode, as natively, while instance
    mode on a 1×1×1 patch is refused whatever the batch size, as ``nn.InstanceNorm3d`` refuses it).
    """
    batch, channels = shape[0], shape[1]
    spatial = 1
    for size in shape[2:]:
        spatial *= size
    floor = 2  # MIN_VALUES_PER_STATISTIC, which TorchScript cannot read as a global
    if mode == "batch":
        values = batch * spatial
        if forced:
            return values != 1
        return batch >= min_batch_size and values >= floor
    if mode == "instance":
        values, threshold = spatial, min_instance_size
    elif mode == "group":
        values, threshold = (channels // num_groups) * spatial, min_group_size
        if not forced and num_groups == 1:
            return False  # one group is layer mode, which comes next in the chain
    elif mode == "layer":
        values, threshold = channels * spatial, floor
    else:
        return True
    if forced:
        return values != 1
    return values >= max(floor, threshold)


def fallback_from(mode: str, training: bool, has_running_stats: bool, walked: List[str], batch_size: int,
                  num_groups: int, min_batch_size: int) -> Optional[str]:
    """``is_fallback`` over plain values, given the ``candidates`` walked: the ``designed`` mode that
    ``mode`` fell back from, or ``None`` where ``mode`` is the design (always in eval with usable
    running statistics, which are valid at every shape)."""
    if not training and has_running_stats:
        return None
    planned = designed(walked, batch_size, num_groups, min_batch_size)
    return None if mode == planned else planned


def choose(shape: List[int], training: bool, chain: List[str], num_groups: int, min_batch_size: int,
           min_instance_size: int, min_group_size: int, has_running_stats: bool) -> str:
    """``choose_mode`` over plain values, given the ``candidates`` to walk."""
    if not training and has_running_stats:
        return "batch"
    for mode in chain:
        if usable(mode, shape, num_groups, False, min_batch_size, min_instance_size, min_group_size):
            return mode
    return "identity"
