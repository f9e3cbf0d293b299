"""Where the layers' warnings point, and how often they repeat.

A layer warns from inside torch's module-call machinery, several ``forward`` methods below the
line that called the model, so a fixed ``stacklevel`` would point at torch or at adanorm, and every
layer of a network would warn on its own. Python 3.11 has no ``skip_file_prefixes``: the stack is
walked here instead, once per layer and regime, never on the hot path.
"""
from __future__ import annotations

import os
import sys
from typing import Hashable, Optional, Set, Tuple
from weakref import WeakKeyDictionary

import torch
from torch import nn

_LIBRARY_DIRECTORIES = tuple(
    os.path.dirname(os.path.abspath(package_init)) + os.sep for package_init in (torch.__file__, __file__)
)
"""torch's and adanorm's package directories (this module sits at adanorm's top level)."""
_REPORTED: "WeakKeyDictionary[nn.Module, Set[Hashable]]" = WeakKeyDictionary()


def calling_site() -> Tuple[int, Optional[nn.Module]]:
    """The ``stacklevel`` that makes a ``warnings.warn`` in this function's caller point at the user's
    code, and the model: the outermost module called on the way there.

    The user's code is the first frame outside torch and adanorm that is not the ``forward`` of an
    ``nn.Module`` (the model's own forward methods are the way down, not the cause); a training
    loop, a Lightning ``training_step`` or nnU-Net's ``train_step`` are where the model is called.
    """
    frame = sys._getframe(1)
    level, model = 1, None
    while frame is not None:
        code = frame.f_code
        owner = frame.f_locals["self"] if code.co_argcount and code.co_varnames[0] == "self" else None
        is_module_method = isinstance(owner, nn.Module)
        if not code.co_filename.startswith(_LIBRARY_DIRECTORIES) and not (is_module_method and code.co_name == "forward"):
            break
        if is_module_method:
            model = owner
        frame, level = frame.f_back, level + 1
    return level, model


def first_report(model: Optional[nn.Module], key: Hashable) -> bool:
    """Whether ``key`` (a regime) is reported for ``model`` for the first time; records it. The record
    dies with the model, so a new model (or a deep copy) is told again."""
    if model is None:
        return True
    reported = _REPORTED.setdefault(model, set())
    if key in reported:
        return False
    reported.add(key)
    return True


def layer_path(model: Optional[nn.Module], layer: nn.Module) -> Optional[str]:
    """The model's class and the layer's dotted name in it (``PlainConvUNet.encoder.stages.0.0.convs.0.norm``),
    so that a warning about one layer of many can be traced; None for a layer called on its own."""
    if model is None or model is layer:
        return None
    name = next((name for name, module in model.named_modules() if module is layer), None)
    return f"{type(model).__name__}.{name}" if name else None
