"""Registers ``"adaptive"`` in MONAI's norm factory, so networks take ``norm="adaptive"``.

``import adanorm`` calls :func:`register_when_imported`, which never imports MONAI itself (it costs
seconds: MONAI pulls in scipy, matplotlib and nibabel). If MONAI's factory module is already imported,
it registers at once; otherwise a small ``sys.meta_path`` finder waits for
``monai.networks.layers.factories`` and registers as soon as that module has finished executing,
whoever imports it and whenever. Without MONAI installed nothing ever happens.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Optional, Sequence

from torch import nn

from adanorm.fusion import BLOCK_RULES, BlockRule, FusedActivationSlot, unfuse

if TYPE_CHECKING:
    from adanorm.fusion import Fusions

FACTORIES_MODULE = "monai.networks.layers.factories"
_SPATIAL_DIMS = (1, 2, 3)
_lock = threading.Lock()


def adaptive_norm_factory(dim: int) -> type:
    """The adaptive layer class for ``dim`` spatial dimensions: what ``norm="adaptive"`` builds in MONAI.

    MONAI's norm factory maps a name and the network's ``spatial_dims`` to a layer class, which the
    network then builds with the channel count and the arguments of its ``norm=("adaptive", {...})``.

    Args:
        dim (int): the network's ``spatial_dims``: 1, 2 or 3.

    Returns:
        type: ``AdaptiveNorm1d``, ``AdaptiveNorm2d`` or ``AdaptiveNorm3d``.

    Raises:
        ValueError: for any other ``dim``.

    Example:
        >>> from adanorm.integrations.monai import adaptive_norm_factory
        >>> adaptive_norm_factory(3).__name__
        'AdaptiveNorm3d'
    """
    from adanorm.norm import AdaptiveNorm1d, AdaptiveNorm2d, AdaptiveNorm3d

    return _by_spatial_dims("adaptive", (AdaptiveNorm1d, AdaptiveNorm2d, AdaptiveNorm3d), dim)


def adaptive_norm_act_factory(dim: int) -> type:
    """The fused layer class for ``dim`` spatial dimensions: what ``norm=("adaptive_act", {...})`` builds in
    MONAI, e.g. in an ``ADN`` whose own ``act`` is ``None``, since the layer applies the activation itself.

    Args:
        dim (int): the network's ``spatial_dims``: 1, 2 or 3.

    Returns:
        type: ``AdaptiveNormAct1d``, ``AdaptiveNormAct2d`` or ``AdaptiveNormAct3d``.

    Raises:
        ValueError: for any other ``dim``.

    Example:
        >>> from adanorm.integrations.monai import adaptive_norm_act_factory
        >>> adaptive_norm_act_factory(3).__name__
        'AdaptiveNormAct3d'
    """
    from adanorm.norm_act import AdaptiveNormAct1d, AdaptiveNormAct2d, AdaptiveNormAct3d

    return _by_spatial_dims("adaptive_act", (AdaptiveNormAct1d, AdaptiveNormAct2d, AdaptiveNormAct3d), dim)


def _by_spatial_dims(name: str, classes: Sequence[type], dim: int) -> type:
    """The class of ``classes`` (for 1, 2 and 3 spatial dimensions) that factory ``name`` builds for ``dim``."""
    if dim not in _SPATIAL_DIMS:
        raise ValueError(f"norm={name!r} supports spatial_dims {', '.join(map(str, _SPATIAL_DIMS))}, got {dim}.")
    return classes[_SPATIAL_DIMS.index(dim)]


def register() -> None:
    """Add ``"adaptive"`` and ``"adaptive_act"`` to MONAI's norm factory (``monai.networks.layers.factories.Norm``) now.

    ``import adanorm`` already arranges this through :func:`register_when_imported`; call it
    directly only where that hook cannot run, e.g. after MONAI's factory module was reloaded.
    Imports MONAI; calling it again is harmless.

    Raises:
        ModuleNotFoundError: without MONAI installed.

    Example:
        >>> from monai.networks.nets import UNet
        >>> from adanorm.integrations.monai import register
        >>> register()
        >>> net = UNet(3, 1, 2, channels=(8, 16), strides=(2,), norm=("adaptive", {"preset": "small_batch"}))
    """
    from monai.networks.layers.factories import Norm

    Norm.add_factory_callable("adaptive", adaptive_norm_factory)
    Norm.add_factory_callable("adaptive_act", adaptive_norm_act_factory)


class _RegisteringLoader(importlib.abc.Loader):
    """The factory module's own loader, plus :func:`register` once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register()

    def __getattr__(self, name: str):  # get_source, get_code, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for MONAI's factory module it wraps the real spec's loader, then steps aside."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None):
        if fullname != FACTORIES_MODULE:
            return None
        _remove_finder()  # one shot; also keeps the search below from finding this finder again
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def _remove_finder() -> None:
    with _lock:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterImport)]


def register_when_imported() -> None:
    """Register ``"adaptive"`` in MONAI's norm factory now if MONAI's factory module is imported, else as
    soon as it is, whoever imports it and whenever.

    ``import adanorm`` calls it, so that ``norm="adaptive"`` works in MONAI networks without an
    extra import and without adanorm paying MONAI's import time (seconds) when MONAI is not used.
    Never imports MONAI; calling it again is harmless.

    Example:
        >>> import adanorm  # calls register_when_imported()
        >>> from monai.networks.nets import BasicUNet
        >>> net = BasicUNet(spatial_dims=3, features=(8, 8, 16, 32, 64, 8), norm="adaptive")
    """
    if FACTORIES_MODULE in sys.modules:
        register()
        return
    with _lock:
        if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())


def _fuse_basic_block(block: nn.Module, fusions: "Fusions") -> bool:
    """``UnetBasicBlock``: conv1 → norm1 → lrelu → conv2 → norm2 → lrelu; both norms take the activation."""
    if not (fusions.fusable(block.norm1, block.lrelu) and fusions.fusable(block.norm2, block.lrelu)):
        return False
    fusions.fuse(block.norm1, block.lrelu, inplace=True)  # their inputs are conv1's and conv2's fresh outputs
    fusions.fuse(block.norm2, block.lrelu, inplace=True)
    block.lrelu = FusedActivationSlot()
    return True


def _unfuse_basic_block(block: nn.Module) -> None:
    block.lrelu = unfuse(block.norm1)
    unfuse(block.norm2)


def _fuse_res_block(block: nn.Module, fusions: "Fusions") -> bool:
    """``UnetResBlock``: norm1 takes the activation; norm2 is followed by the residual sum, so the block's
    last ``lrelu`` stays, and the block becomes ``FusedUnetResBlock``, whose forward skips the first one."""
    if not fusions.fusable(block.norm1, block.lrelu):
        return False
    from adanorm.integrations.monai_blocks import FusedUnetResBlock

    fusions.fuse(block.norm1, block.lrelu, inplace=True)
    block.__class__ = FusedUnetResBlock
    return True


def _unfuse_res_block(block: nn.Module) -> None:
    unfuse(block.norm1)
    block.__class__ = block.__class__.__bases__[0]


_DYNUNET_BLOCKS = "monai.networks.blocks.dynunet_block."
BLOCK_RULES[_DYNUNET_BLOCKS + "UnetBasicBlock"] = BlockRule(_fuse_basic_block, _unfuse_basic_block)
BLOCK_RULES[_DYNUNET_BLOCKS + "UnetResBlock"] = BlockRule(_fuse_res_block, _unfuse_res_block)
