"""Whole-model conversion between native norm layers and adaptive ones, keeping the state.

A converted layer must behave exactly like the layer it replaced wherever that layer could run,
in training and in eval, for every combination of affine, track_running_stats and momentum, so
each gets a policy that encodes the native semantics (``_faithful_policy``), and ``revert``
rebuilds the very configuration it came from.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Callable, Dict, Tuple, Type, Union

from torch import nn

from adanorm.fusion import NORM_BY_FUSED, fuse_activations, unfuse_activations
from adanorm.norm import AdaptiveNorm, AdaptiveNorm1d, AdaptiveNorm2d, AdaptiveNorm3d
from adanorm.norm_act import AdaptiveNormAct
from adanorm.policy import Policy, get_policy, native_first

_ADAPTIVE_BY_NATIVE: Dict[Type[nn.Module], Type[AdaptiveNorm]] = {
    nn.BatchNorm1d: AdaptiveNorm1d,
    nn.BatchNorm2d: AdaptiveNorm2d,
    nn.BatchNorm3d: AdaptiveNorm3d,
    nn.InstanceNorm1d: AdaptiveNorm1d,
    nn.InstanceNorm2d: AdaptiveNorm2d,
    nn.InstanceNorm3d: AdaptiveNorm3d,
    nn.SyncBatchNorm: AdaptiveNorm,
    nn.GroupNorm: AdaptiveNorm,
}
_BATCH_BY_ADAPTIVE = {AdaptiveNorm1d: nn.BatchNorm1d, AdaptiveNorm2d: nn.BatchNorm2d, AdaptiveNorm3d: nn.BatchNorm3d}
_INSTANCE_BY_ADAPTIVE = {AdaptiveNorm1d: nn.InstanceNorm1d, AdaptiveNorm2d: nn.InstanceNorm2d, AdaptiveNorm3d: nn.InstanceNorm3d}


NATIVE_BATCH_NORM_MIN_BATCH_SIZE = 1
"""``min_batch_size`` of converted BatchNorm layers: batch statistics at every batch size, batch 1
included, as native BatchNorm computes them (over the N·S values of each channel), so fine-tuning a
BatchNorm checkpoint at any batch keeps updating the running statistics it evaluates with, where a
fresh adaptive layer (``min_batch_size=32``) would train in group mode. Batch mode's own floor (two
values per statistic) then makes it fall back only where native BatchNorm raises, at N·S = 1."""


def _native_config(module: nn.Module) -> Dict[str, Any]:
    """The constructor arguments that rebuild ``module`` exactly (``revert`` uses them)."""
    if isinstance(module, nn.GroupNorm):
        return {"num_groups": module.num_groups, "num_channels": module.num_channels, "eps": module.eps,
                "affine": module.affine, "bias": module.bias is not None or module.weight is None}
    config = {"num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
              "affine": module.affine, "track_running_stats": module.track_running_stats,
              "bias": module.bias is not None or module.weight is None}
    if isinstance(module, nn.SyncBatchNorm):
        config["process_group"] = module.process_group
    return config


def _faithful_policy(module: nn.Module, base: Union[Policy, str, None]) -> Policy:
    """A policy under which the adaptive layer normalizes as ``module`` does wherever ``module`` can run,
    in training and in eval, and falls back only where it would raise.

    BatchNorm keeps batch statistics at every batch size (``NATIVE_BATCH_NORM_MIN_BATCH_SIZE``) unless
    ``base`` says otherwise; it uses its running statistics in eval even at their initial values (as
    native does), and without running statistics uses batch statistics in eval too. InstanceNorm and
    GroupNorm start the chain at their own mode with thresholds at the native floor; InstanceNorm with
    running statistics updates and evaluates with them as ``F.instance_norm`` does.
    """
    base = None if base is None else get_policy(base)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        policy = base or Policy(min_batch_size=NATIVE_BATCH_NORM_MIN_BATCH_SIZE)
        return replace(policy, native_eval_rule=module.track_running_stats,
                       eval_batch_stats=not module.track_running_stats)
    first_mode = "group" if isinstance(module, nn.GroupNorm) else "instance"
    tracks = first_mode == "instance" and module.track_running_stats
    return replace(native_first(first_mode, base), native_eval_rule=tracks, instance_running_stats=tracks)


def _factory_kwargs(module: nn.Module) -> Dict[str, Any]:
    """Device and dtype of a layer's floating-point state, so the replacement is built in place."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _adaptive_from_native(module: nn.Module, kwargs: Dict[str, Any]) -> AdaptiveNorm:
    config = _native_config(module)
    options = dict(kwargs)
    if isinstance(module, nn.GroupNorm):
        options.setdefault("num_groups", config["num_groups"])
        num_features, momentum, track = config["num_channels"], 0.1, False
    else:
        num_features, momentum, track = config["num_features"], config["momentum"], config["track_running_stats"]
        if momentum is None and isinstance(module, nn.modules.instancenorm._InstanceNorm):
            momentum = 0.0  # F.instance_norm reads momentum=None as 0: its running statistics never move
    if isinstance(module, nn.SyncBatchNorm):
        options.setdefault("sync", True)
        options.setdefault("process_group", config["process_group"])
    if options.get("mode", "auto") == "auto":
        options["policy"] = _faithful_policy(module, options.get("policy"))
    if "preset" not in options:
        options.setdefault("momentum", momentum)
    adaptive = _ADAPTIVE_BY_NATIVE[type(module)](
        num_features, config["eps"], affine=config["affine"], track_running_stats=track, bias=config["bias"],
        **_factory_kwargs(module), **options,
    )
    adaptive.load_state_dict(module.state_dict(), strict=True)
    adaptive.train(module.training)
    adaptive._native_spec = (type(module), config)
    return adaptive


def _native_from_adaptive(module: AdaptiveNorm) -> nn.Module:
    if isinstance(module, AdaptiveNormAct):  # built fused, not by a fusion: the native pair, in that order
        return nn.Sequential(_native_from_adaptive(_unfused_copy(module)), module.activation)
    native_cls, config = module._native_spec or _native_for_first_mode(module)
    native = native_cls(**config, **_factory_kwargs(module))
    state = module.state_dict()
    if isinstance(native, nn.GroupNorm):
        state = {k: v for k, v in state.items() if k in ("weight", "bias")}
    native.load_state_dict(state, strict=True)
    native.train(module.training)
    return native


def _unfused_copy(layer: AdaptiveNormAct) -> AdaptiveNorm:
    """The norm of a fused layer built as such, as the ``AdaptiveNorm`` class of its dimension (its state shared)."""
    norm = copy.copy(layer)
    norm.__dict__["_modules"] = {name: child for name, child in layer._modules.items() if name != "activation"}
    norm.__class__ = NORM_BY_FUSED.get(type(layer), AdaptiveNorm)
    return norm


def _native_for_first_mode(module: AdaptiveNorm) -> Tuple[Type[nn.Module], Dict[str, Any]]:
    """For layers built as adaptive (not converted): the native class of the mode they start with."""
    first_mode = module.mode if module.mode != "auto" else module.policy.chain[0]
    has_bias = module.bias is not None or module.weight is None
    config = {"eps": module.eps, "affine": module.affine, "bias": has_bias}
    if first_mode == "batch":
        if type(module) not in _BATCH_BY_ADAPTIVE:
            raise TypeError(
                "revert: a dimension-agnostic AdaptiveNorm in batch mode has no single native class; "
                "use AdaptiveNorm1d/2d/3d so revert can pick BatchNorm1d/2d/3d."
            )
        return _BATCH_BY_ADAPTIVE[type(module)], {
            "num_features": module.num_features, "momentum": module.momentum,
            "track_running_stats": module.track_running_stats, **config}
    if first_mode == "instance" and type(module) in _INSTANCE_BY_ADAPTIVE:
        return _INSTANCE_BY_ADAPTIVE[type(module)], {
            "num_features": module.num_features, "momentum": module.momentum or 0.1,
            "track_running_stats": module.track_running_stats, **config}
    groups = {"instance": module.num_features, "layer": 1}.get(first_mode, module.num_groups)
    return nn.GroupNorm, {"num_groups": groups, "num_channels": module.num_features, **config}


def replace_modules(
    model: nn.Module, should_replace: Callable[[nn.Module], bool], build: Callable[[nn.Module], nn.Module]
) -> nn.Module:
    """Replace, in place, every submodule of ``model`` for which ``should_replace`` holds by ``build(submodule)``.

    The one module walk behind :func:`convert`, :func:`revert` and the recipes' model builders. A
    replaced module's own children are not visited (its replacement is final), and ``model`` itself
    is tested first, so a bare layer comes back as its replacement. A module reachable under several
    names (nnU-Net's blocks hold their norm both as ``.norm`` and inside ``.all_modules``) is built
    once and stays shared: two copies would train one and checkpoint both.

    Args:
        model: the module to walk; changed in place.
        should_replace: whether a module is to be replaced.
        build: the replacement of a module ``should_replace`` accepted.

    Returns:
        ``model``, or ``build(model)`` when ``model`` itself is replaced.
    """
    return _replace_shared(model, should_replace, build, {})


def _replace_shared(model: nn.Module, should_replace: Callable[[nn.Module], bool], build: Callable[[nn.Module], nn.Module],
                    replacements: Dict[int, nn.Module]) -> nn.Module:
    """``replace_modules`` with ``replacements`` (by ``id`` of the original) shared across the walk."""
    if id(model) in replacements:
        return replacements[id(model)]
    if should_replace(model):
        replacements[id(model)] = build(model)
        return replacements[id(model)]
    replacements[id(model)] = model
    for name, child in model.named_children():
        replacement = _replace_shared(child, should_replace, build, replacements)
        if replacement is not child:
            setattr(model, name, replacement)
    return model


def convert(model: nn.Module, fuse_activation: bool = False, **kwargs: Any) -> nn.Module:
    """Replace every BatchNorm, InstanceNorm and GroupNorm layer in ``model`` by an adaptive one.

    Networks come with native norm layers (MONAI's, torchvision's, pretrained checkpoints), and those
    raise on shapes that small-batch 3D training produces: BatchNorm on a batch of one sample with a
    1×1×1 feature map, InstanceNorm on a single voxel. Each converted layer normalizes exactly as
    the native layer did wherever that layer could run, in training and in eval, and falls back to
    another mode only where the native layer would raise; so a converted checkpoint gives the same
    numbers, and :func:`revert` gives the native layers back.

    ``BatchNorm1d/2d/3d`` become ``AdaptiveNorm1d/2d/3d`` that keep batch statistics at every batch
    size, batch 1 included, so fine-tuning at small batch updates the running statistics that eval
    uses exactly as native BatchNorm does; only a single value per channel (batch 1 with a 1×1×1
    feature map) falls back, with a ``FallbackWarning``. ``InstanceNorm1d/2d/3d`` and ``GroupNorm``
    start the fallback chain at their own mode. ``SyncBatchNorm`` becomes an ``AdaptiveNorm`` synced
    over the same process group. Parameters, buffers, device, dtype and the train/eval flag carry over.

    Args:
        model (nn.Module): the network, changed in place. A bare norm layer is converted too.
        fuse_activation (bool): also fuse every converted layer that the network's structure shows is
            followed by a leaky ReLU, ELU or PReLU into an :class:`~adanorm.AdaptiveNormAct`, which keeps
            only the activation's output for backward; the activation's place gets an ``nn.Identity``
            (``adanorm.fusion`` says which structures are read; ReLU pairs stay, with one warning).
            Default: ``False``
        **kwargs: arguments for every adaptive layer's constructor, such as ``preset="small_batch"``
            (instead of the native ``momentum``), ``policy=`` (a :class:`~adanorm.Policy` or a
            ``NAMED_POLICIES`` name, still given the native eval rule), ``mode="instance"`` (a fixed
            mode instead of the native behaviour) or ``sync=True``.

    Returns:
        nn.Module: ``model``, or the adaptive replacement when ``model`` is itself a norm layer.

    Raises:
        TypeError: if ``kwargs`` hold an argument the adaptive constructor does not take.

    Example:
        >>> import torch, adanorm
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv3d(1, 8, 3), nn.BatchNorm3d(8), nn.ReLU())
        >>> model = adanorm.convert(model, preset="small_batch")
        >>> type(model[1]).__name__
        'AdaptiveNorm3d'
        >>> model(torch.randn(1, 1, 3, 3, 3)).shape  # one value per channel: BatchNorm3d raises here
        torch.Size([1, 8, 1, 1, 1])
    """
    model = replace_modules(model, lambda m: type(m) in _ADAPTIVE_BY_NATIVE, lambda m: _adaptive_from_native(m, kwargs))
    return fuse_activations(model) if fuse_activation else model


def revert(model: nn.Module) -> nn.Module:
    """Replace every adaptive layer in ``model`` by a native one, keeping parameters and buffers.

    For runtimes and tools that know only the native layers, and to compare a model with and
    without adaptive normalization. A layer :func:`convert` made becomes exactly the layer it
    replaced (class and every constructor argument). A layer built as adaptive becomes the native
    class of the first mode it would run: ``BatchNorm1d/2d/3d`` for batch mode,
    ``InstanceNorm1d/2d/3d`` for instance mode, ``GroupNorm`` otherwise (which has no running
    statistics, so these are dropped). Native layers cannot fall back: they raise on the shapes
    the adaptive layers fell back on.

    Args:
        model (nn.Module): the network, changed in place. A bare adaptive layer is reverted too.

    Returns:
        nn.Module: ``model``, or the native replacement when ``model`` is itself an adaptive layer.

    Raises:
        TypeError: for a dimension-agnostic :class:`~adanorm.AdaptiveNorm` (not ``AdaptiveNorm1d/2d/3d``)
            built to start in batch mode, which no single native class matches.

    Example:
        >>> import adanorm
        >>> from torch import nn
        >>> model = adanorm.convert(nn.Sequential(nn.Conv3d(1, 8, 3), nn.BatchNorm3d(8, momentum=0.01)))
        >>> native = adanorm.revert(model)[1]
        >>> type(native).__name__, native.momentum
        ('BatchNorm3d', 0.01)
    """
    return replace_modules(unfuse_activations(model), lambda m: isinstance(m, AdaptiveNorm), _native_from_adaptive)
