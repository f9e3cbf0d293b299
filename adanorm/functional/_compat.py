"""The private torch APIs adanorm calls, and the torch behaviours that differ between the releases
pyproject.toml admits, one name each, so that a torch release that moves one breaks one function here
rather than the modules that use it.

Each function names the releases that have what it calls, and what happens on one that does not.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

try:
    # torch 2.0 to 2.15 (torch's own meta kernels use it); a DDE-safe rewrite of c10's rule since 2.13.
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

    ``cpp_extension._get_build_directory`` is in every torch from 1.0 to 2.15. On a torch without it
    this raises AttributeError, which ``cpu_ops.load`` reports in its warning before the native
    kernels take over: the package keeps working, without the compiled kernels.
    """
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False))


def extension_lock_outlives_a_killed_build() -> bool:
    """Whether the ``lock`` file that ``cpp_extension.load`` serializes builds with blocks by its mere
    existence, so that a build killed part-way leaves a stale lock that makes every later build wait
    forever: torch's ``FileBaton``, to torch 2.13. From 2.14 torch holds an OS lock on that file
    (``FileLock``), which the kernel releases when its holder dies, and a file left behind is harmless."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


def _release(version: str) -> tuple:
    """(major, minor) of a torch version string such as ``2.15.0+cu132`` or ``2.16.0a0+git1234``."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


NATIVE_GROUP_NORM_BACKWARD_FIXED = _release(torch.__version__) >= (2, 14)
"""Whether native group norm's CPU backward has neither of two bugs, both fixed in torch 2.14.0 (seen
in 2.4.1, 2.12.0 and 2.13.0; fixed in 2.14.0, 2.14.1 and 2.15.0): on channels-last input it crashes
the process when γ or β wants a gradient and the input does not, and it raises "tensor does not have
a device" for a shift without a scale. adanorm's workarounds (``dispatch._group_norm``,
``dispatch._scale_beside_shift``, the ``adanorm::native_group_norm`` operator) give the same numbers
on every release, so they run on all of them while pyproject.toml admits a torch before 2.14;
the canaries in ``test_reliability_core.py`` check this flag against the torch they run on."""
