"""The private torch APIs adanorm calls, one function each, so that a torch release that moves one
breaks one function here rather than the modules that use it.

pyproject.toml admits torch 2.4 to 2.13; each function names the releases that have what it calls,
and what happens on one that does not.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

try:
    # torch 2.0 to 2.13 (torch's own meta kernels use it); a DDE-safe rewrite of c10's rule since 2.13.
    from torch._prims_common import suggest_memory_format as _private_suggest_memory_format
except ImportError:  # a later torch that moved it
    _private_suggest_memory_format = None


def suggest_memory_format(tensor: Tensor) -> torch.memory_format:
    """``Tensor.suggest_memory_format()``, which torch does not expose in Python: the layout PyTorch's
    norm kernels give their output for ``tensor`` (channels-last for channels-last strides)."""
    if _private_suggest_memory_format is not None:
        return _private_suggest_memory_format(tensor)
    return public_suggest_memory_format(tensor)


def public_suggest_memory_format(tensor: Tensor) -> torch.memory_format:
    """``suggest_memory_format`` from public calls only, where torch no longer has the private one:
    ``empty_like`` keeps a dense tensor's strides and lays any other out by c10's
    ``suggest_memory_format``, so channels-last strides survive it exactly when that rule says
    channels-last (the rules differ only where size-1 dimensions leave strides ambiguous)."""
    if tensor.dim() in (4, 5) and not tensor.is_contiguous():
        channels_last = torch.channels_last_3d if tensor.dim() == 5 else torch.channels_last
        if torch.empty_like(tensor).is_contiguous(memory_format=channels_last):
            return channels_last
    return torch.contiguous_format


def extension_build_directory(name: str) -> Path:
    """The directory ``torch.utils.cpp_extension.load(name=name)`` builds in (under
    ``TORCH_EXTENSIONS_DIR``), created if missing.

    ``cpp_extension._get_build_directory`` is in every torch from 1.0 to 2.13. On a torch without it
    this raises AttributeError, which ``cpu_ops.load`` reports in its warning before the native
    kernels take over: the package keeps working, without the compiled kernels.
    """
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False))
