"""The compiled CPU operators from Python: getting them into the process, their fake kernels, and one
module object over them.

The operators are defined and implemented in C++ (``csrc/norm_cpu_ops.cpp``, ``TORCH_LIBRARY(adanorm,
...)``): ``torch.ops.adanorm.fused_norm``, ``native_group_norm`` and ``blend_running_stats``, with CPU
and autograd kernels there, and the internal ``_fused_norm_forward`` / ``_fused_norm_backward`` that
the autograd kernel of ``fused_norm`` runs (they also carry the saved statistics), and the fused norm +
activation ``norm_activation`` / ``norm_activation_`` (in place; ``norm_act`` calls them), whose autograd
kernel runs the internal ``_norm_activation_forward`` / ``_norm_activation_backward``. Their fake kernels,
here, give output shapes, dtypes and layouts without running the kernels, so that FakeTensor, dynamo,
AOTAutograd and torch.export see one operator instead of an opaque call. The library names this
module (``set_python_module``), so FakeTensor imports it when it first meets an operator.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from adanorm.functional import cpu_build
from adanorm.functional._compat import suggest_memory_format


def registered() -> bool:
    """Whether the adanorm operators are registered in this process (by ``load``, or by a
    ``torch.ops.load_library`` of the library elsewhere)."""
    return hasattr(torch.ops.adanorm, "fused_norm")


def load(build_wait_s: float) -> Optional[ModuleType]:
    """The operators (``operators()``), compiled and loaded first unless this process has them; None
    where they cannot be built, after a warning that says what to do. Another process's build is
    waited for at most ``build_wait_s`` seconds."""
    if not registered():
        # Loading the library again, after a rebuild or from another directory, would register the
        # operators a second time, which aborts the process.
        try:
            cpu_build.build_and_load(build_wait_s)
        except cpu_build.BuildWaitExpired as expired:
            warnings.warn(str(expired), RuntimeWarning, stacklevel=4)
            return None
        except Exception as error:  # no compiler or ninja: native kernels still give the same numbers
            warnings.warn(
                f"adanorm: could not compile its CPU kernels ({type(error).__name__}: {error}); using PyTorch's "
                "native norm kernels, which are slower on channels_last_3d input. Install a C++ compiler and "
                "`pip install ninja` to enable them, or set ADANORM_CPU_KERNEL=0 to silence this.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
    return operators()


@lru_cache(maxsize=None)
def operators() -> ModuleType:
    """The registered operators as one module: ``fused_norm``, ``native_group_norm`` and
    ``blend_running_stats`` are ``torch.ops.adanorm.<name>.default``, ``__file__`` the shared library.
    The first call registers the fake kernels (once per process: torch 2.12 raises on a second
    registration)."""
    if not registered():
        raise RuntimeError("adanorm's compiled CPU operators are not loaded in this process: "
                           "adanorm.functional.dispatch.cpu_kernels() loads them, or warns why it cannot")
    for name, fake in _FAKE_KERNELS.items():
        torch.library.register_fake(name, fake)
    kernels = ModuleType("adanorm._cpu_kernels", "adanorm's compiled CPU kernels: torch.ops.adanorm operators")
    kernels.__file__ = next(
        (path for path in sorted(torch.ops.loaded_libraries) if Path(path).name == f"{cpu_build.EXTENSION}.so"), None)
    kernels.fused_norm = torch.ops.adanorm.fused_norm.default
    kernels.native_group_norm = torch.ops.adanorm.native_group_norm.default
    kernels.blend_running_stats = torch.ops.adanorm.blend_running_stats.default
    kernels.norm_activation = torch.ops.adanorm.norm_activation.default
    kernels.norm_activation_ = torch.ops.adanorm.norm_activation_.default
    return kernels


def _dense_format(input: torch.Tensor) -> torch.memory_format:
    """The layout the compiled kernels give their output (``dense_layout`` in norm_cpu_ops.cpp): channels-last
    for input dense in channels_last(_3d) and not also contiguous, or a strided view that native
    kernels lay out channels-last; else contiguous."""
    if input.dim() in (4, 5) and not input.is_contiguous():
        channels_last = torch.channels_last_3d if input.dim() == 5 else torch.channels_last
        if input.is_contiguous(memory_format=channels_last) or suggest_memory_format(input) == channels_last:
            return channels_last
    return torch.contiguous_format


# Fake kernels. Arguments are those of the operators' schemas in norm_cpu_ops.cpp.
def _fake_fused_norm(input, weight, bias, groups, eps, running_mean, running_var, momentum):
    return torch.empty_like(input, memory_format=_dense_format(input))


def _fake_fused_norm_forward(input, weight, bias, groups, eps, running_mean, running_var, momentum):
    mean = input.new_empty((input.shape[0], input.shape[1]), dtype=torch.float64)  # (N, C) tables
    return _fake_fused_norm(input, weight, bias, groups, eps, running_mean, running_var, momentum), mean, \
        torch.empty_like(mean)


def _fake_fused_norm_backward(grad_output, input, weight, mean, rstd, groups, need_input):
    grad_input = torch.empty_like(input, memory_format=_dense_format(input)) if need_input else None
    grad_weight = input.new_empty((input.shape[1],), dtype=torch.float64 if weight is None else weight.dtype)
    return grad_input, grad_weight, torch.empty_like(grad_weight)


def _fake_norm_activation_forward(input, weight, bias, groups, eps, activation, parameter, parameter_weight, out):
    table = input.new_empty((input.shape[0], input.shape[1]), dtype=torch.float64)  # (N, C) mean, rstd
    vector = input.new_empty((input.shape[1],))  # batch mean, unbiased variance, in the input's dtype
    return table, torch.empty_like(table), vector, torch.empty_like(vector)


def _fake_norm_activation_backward(grad_output, output, weight, bias, rstd, groups, activation, parameter,
                                   parameter_weight, input, mean, need_input, need_parameter_weight):
    grad_slopes = torch.empty_like(parameter_weight) if need_parameter_weight else None
    return (*_fake_fused_norm_backward(grad_output, output, weight, rstd, rstd, groups, need_input), grad_slopes)


def _fake_norm_activation(input, weight, bias, parameter_weight, groups, eps, activation, parameter,
                          max_shift_per_scale):
    vector = input.new_empty((input.shape[1],))  # batch mean, unbiased variance, in the input's dtype
    return torch.empty_like(input, memory_format=_dense_format(input)), vector, torch.empty_like(vector)


def _fake_norm_activation_inplace(input, weight, bias, parameter_weight, groups, eps, activation, parameter,
                                  max_shift_per_scale):
    vector = input.new_empty((input.shape[1],))
    return input, vector, torch.empty_like(vector)


def _fake_native_group_norm(input, weight, bias, groups, eps):
    return torch.empty_like(input, memory_format=suggest_memory_format(input))  # as at::group_norm lays it out


def _fake_blend_running_stats(running_mean, running_var, batch_mean, batch_var, momentum, momentum_tensor,
                              nonfinite_skips):
    return None  # mutates its (a!), (b!), (c!) arguments only


_FAKE_KERNELS = {
    "adanorm::fused_norm": _fake_fused_norm,
    "adanorm::_fused_norm_forward": _fake_fused_norm_forward,
    "adanorm::_fused_norm_backward": _fake_fused_norm_backward,
    "adanorm::_norm_activation_forward": _fake_norm_activation_forward,
    "adanorm::_norm_activation_backward": _fake_norm_activation_backward,
    "adanorm::norm_activation": _fake_norm_activation,
    "adanorm::norm_activation_": _fake_norm_activation_inplace,
    "adanorm::native_group_norm": _fake_native_group_norm,
    "adanorm::blend_running_stats": _fake_blend_running_stats,
}

if registered():
    operators()  # the library was loaded before this module: FakeTensor importing it, or a load_library elsewhere
