"""Whole-model conversion between native norm layers and adaptive ones, keeping the state.

A converted layer must behave exactly like the layer it replaced wherever that layer could run,
so InstanceNorm and GroupNorm start their fallback chain at their own mode, with thresholds at
the native layer's own limit (more than one value per statistic).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional, Type

import torch
from torch import nn

from adanorm.norm import AdaptiveNorm, AdaptiveNorm1d, AdaptiveNorm2d, AdaptiveNorm3d
from adanorm.policy import MIN_VALUES_PER_STATISTIC, Policy

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


def _native_floor_policy(first_mode: str, base: Optional[Policy]) -> Policy:
    chain = ("instance", "group", "layer", "identity") if first_mode == "instance" else ("group", "layer", "identity")
    return replace(
        base or Policy(),
        chain=chain,
        min_instance_size=MIN_VALUES_PER_STATISTIC,
        min_group_size=MIN_VALUES_PER_STATISTIC,
    )


def _factory_kwargs(module: nn.Module) -> Dict[str, Any]:
    """Device and dtype of a layer's floating-point state, so the replacement is built in place."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _adaptive_from_native(module: nn.Module, kwargs: Dict[str, Any]) -> AdaptiveNorm:
    adaptive_cls = _ADAPTIVE_BY_NATIVE[type(module)]
    options = dict(kwargs)
    first_mode = "batch"
    if isinstance(module, nn.GroupNorm):
        num_features, momentum, track = module.num_channels, 0.1, False
        options.setdefault("num_groups", module.num_groups)
        first_mode = "group"
    else:
        num_features, momentum, track = module.num_features, module.momentum, module.track_running_stats
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            first_mode = "instance"
    if first_mode != "batch" and options.get("mode", "auto") == "auto":
        options["policy"] = _native_floor_policy(first_mode, options.get("policy"))
    if "preset" not in options:
        options.setdefault("momentum", momentum)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    adaptive = adaptive_cls(
        num_features,
        module.eps,
        affine=module.affine,
        track_running_stats=track,
        bias=bias is not None or weight is None,
        **_factory_kwargs(module),
        **options,
    )
    adaptive.load_state_dict(module.state_dict(), strict=True)
    adaptive.train(module.training)
    return adaptive


def _native_from_adaptive(module: AdaptiveNorm) -> nn.Module:
    first_mode = module.mode if module.mode != "auto" else module.policy.chain[0]
    factory = _factory_kwargs(module)
    has_bias = module.bias is not None or module.weight is None
    if first_mode == "batch":
        native_cls = _BATCH_BY_ADAPTIVE.get(type(module))
        if native_cls is None:
            raise TypeError(
                "revert: a dimension-agnostic AdaptiveNorm in batch mode has no single native class; "
                "use AdaptiveNorm1d/2d/3d so revert can pick BatchNorm1d/2d/3d."
            )
        native = native_cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, bias=has_bias, **factory)
    elif first_mode == "instance" and type(module) in _INSTANCE_BY_ADAPTIVE:
        native = _INSTANCE_BY_ADAPTIVE[type(module)](
            module.num_features, module.eps, module.momentum or 0.1, module.affine, module.track_running_stats, bias=has_bias, **factory
        )
    else:
        groups = {"instance": module.num_features, "layer": 1}.get(first_mode, module.num_groups)
        native = nn.GroupNorm(groups, module.num_features, module.eps, module.affine, bias=has_bias, **factory)
    state = module.state_dict()
    if isinstance(native, nn.GroupNorm):
        state = {k: v for k, v in state.items() if k in ("weight", "bias")}
    native.load_state_dict(state, strict=True)
    native.train(module.training)
    return native


def _replace_modules(model: nn.Module, should_replace, build) -> nn.Module:
    if should_replace(model):
        return build(model)
    for name, child in model.named_children():
        replacement = _replace_modules(child, should_replace, build)
        if replacement is not child:
            setattr(model, name, replacement)
    return model


def convert(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Replace every BatchNorm/InstanceNorm/GroupNorm in ``model`` by the matching adaptive layer.

    ``kwargs`` go to each adaptive layer's constructor (``preset=``, ``policy=``, ``mode=`` ...).
    Parameters, running statistics, device, dtype and train/eval flags are kept; the model is
    changed in place and returned (a bare norm layer is returned as its replacement).
    """
    return _replace_modules(model, lambda m: type(m) in _ADAPTIVE_BY_NATIVE, lambda m: _adaptive_from_native(m, kwargs))


def revert(model: nn.Module) -> nn.Module:
    """Replace every adaptive layer by the native class of its first mode, keeping the state."""
    return _replace_modules(model, lambda m: isinstance(m, AdaptiveNorm), _native_from_adaptive)
