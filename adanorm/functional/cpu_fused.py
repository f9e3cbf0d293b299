"""Fused CPU backend: every training-statistics mode in two memory passes per direction, in either layout.

Native CPU kernels pay for layout and generality: ``instance_norm`` copies channels_last_3d input
to contiguous and back, channels-last ``group_norm`` parallelizes over groups (starved with one
group per channel), is slow backward and loses float32 precision at large means, and
``batch_norm`` makes extra passes for its statistics. In ``csrc/norm_cpu.cpp`` every mode is the
same three steps, mirroring the Triton backend:

1. one read pass: shifted per-(sample, channel) sums;
2. pooling those (N, C) tables over the mode's set (the channels of a group, or the samples for
   batch mode) with Chan's formula, and folding γ, β into a per-(n, c) scale and shift;
3. one read+write pass: ``y = scale·x + shift`` in the input's own layout.

Backward is the same shape: Σdy and Σdy·(x−μ) in one pass, then dx = A·dy + B·x + C in one pass.

The kernels are torch operators, registered in C++ (``TORCH_LIBRARY(adanorm, ...)``):
``torch.ops.adanorm.fused_norm`` and ``torch.ops.adanorm.native_group_norm``, with CPU and autograd
kernels in C++ (a call costs a few microseconds beyond its two passes) and fake kernels here
(shapes and layouts only), so that torch.compile, AOTAutograd, torch.export and torch.jit.trace
see one operator instead of an opaque call. ``_fused_norm_forward`` / ``_fused_norm_backward`` are
what the autograd kernel of ``fused_norm`` runs (they also carry the saved statistics).

The source compiles once per machine and torch version on first use (``torch.utils.cpp_extension``,
about a minute, cached under ``TORCH_EXTENSIONS_DIR``; ``python -m adanorm.build`` does it ahead of
time); ``cpu_kernels()`` builds and loads it, which registers the operators. Without a compiler, or
with ``ADANORM_CPU_KERNEL=0``, callers keep the native kernels.

The extension also wires native group norm into autograd with a backward that cannot crash
(``native_group_norm``; see ``adanorm.functional.dispatch._group_norm``).

The Python wrappers below are for eager calls: dynamo cannot trace ``cpu_kernels()`` (it builds),
so captured code calls ``torch.ops.adanorm.fused_norm`` / ``native_group_norm`` directly (arguments
in schema order: input, weight, bias, groups, eps[, running_mean, running_var, momentum]). Through
``torch.ops`` a call costs about 2-4 µs more than the previous pybind11 binding did (Python
arguments converted against the schema); the dispatcher itself adds well under a microsecond.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Union

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from adanorm.functional.layout import KERNEL_DTYPES, is_channels_last

__all__ = ["cpu_kernels", "prefer_fused_cpu", "fused_norm", "native_group_norm"]

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "norm_cpu.cpp"
# Instruction-set flags follow the vector level PyTorch itself dispatches to, never -march=native: a
# build cached in a shared home directory must also run on the other nodes of a cluster. The level
# is part of the extension's name, so nodes with different levels keep separate builds.
_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability().lower()
_EXTENSION = f"adanorm_norm_cpu_{_CPU_CAPABILITY}"
_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}.get(_CPU_CAPABILITY, [])
# Smallest inputs worth the fused kernels, measured on 2-core x86 CPUs with benchmarks/norms.py and
# benchmarks/thresholds.py (each cell with the compiled kernels forced against the native ones forced):
# below these, the native kernels' lower fixed cost per call wins. Contiguous per-sample modes
# compete with native group norm, which makes two cache-local passes per (sample, group) pair as the
# compiled kernels do; they win there above 2^18 values (cheaper sums, and a backward that reuses a
# pair while it is in cache; at 2^18 float32 they were 1.1-1.15x slower on a 2-core Xeon,
# 2026-11-30), and from 2^16 when there are fewer pairs than threads: native group norm runs each
# pair on one thread, so layer mode at batch 1 would leave threads idle. Channels-last layer mode
# (one group) is the exception among channels-last inputs: native group norm's channels-last kernel
# with one group beats the compiled one below 2^17 values (forward 1.06-1.47x faster there; from 2^17
# the compiled kernel's forward was 0.7-0.9x native's at batch 1, 0.9-1.2x at batch 2, same Xeon).
MIN_NUMEL_BATCH = 1 << 14
MIN_NUMEL_PER_SAMPLE_CHANNELS_LAST = 1 << 12
MIN_NUMEL_LAYER_CHANNELS_LAST = 1 << 17
MIN_NUMEL_PER_SAMPLE_CONTIGUOUS = 1 << 19
MIN_NUMEL_PER_SAMPLE_FEW_GROUPS = 1 << 16


# Seconds a process waits for another process's build of the kernels before it keeps the native
# kernels (ADANORM_BUILD_WAIT overrides): a build takes about a minute on two cores.
DEFAULT_BUILD_WAIT_S = 600.0
BUILD_LOCK = "adanorm.lock"  # adanorm's lock file in the build directory, next to torch's "lock"


class BuildWaitExpired(Exception):
    """Another process held the build lock for longer than ADANORM_BUILD_WAIT seconds."""


@lru_cache(maxsize=None)
def cpu_kernels() -> Optional[ModuleType]:
    """The compiled kernels, or None (disabled, no toolchain, or another process's build did not end
    in time: a warning says what to do). Their ``fused_norm`` and ``native_group_norm`` are the
    operators ``torch.ops.adanorm.fused_norm.default`` and ``torch.ops.adanorm.native_group_norm.default``
    (``__file__``: the shared library), which this call registers by loading the library."""
    global _library
    if os.environ.get("ADANORM_CPU_KERNEL", "1") == "0":
        return None
    if _registered():
        # Loaded earlier in this process (before a cache_clear, or by torch.ops.load_library): loading
        # again, after a rebuild or from another directory, would register the operators a second
        # time, which aborts the process.
        return _kernels_module()
    from torch.utils import cpp_extension

    try:
        build_directory = Path(cpp_extension._get_build_directory(_EXTENSION, verbose=False))
        if not (build_directory / f"{_EXTENSION}.so").exists():
            print("adanorm: compiling its CPU kernels (once per machine and torch version, about a minute)...",
                  file=sys.stderr, flush=True)
        with _build_lock(build_directory):
            # A plain library, not a Python module: loading it registers the operators.
            _library = cpp_extension.load(name=_EXTENSION, sources=[str(_SOURCE)], build_directory=str(build_directory),
                                          extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS], is_python_module=False,
                                          verbose=False)
    except BuildWaitExpired as expired:
        warnings.warn(str(expired), RuntimeWarning, stacklevel=3)
        return None
    except Exception as error:  # no compiler or ninja: native kernels still give the same numbers
        warnings.warn(
            f"adanorm: could not compile its CPU kernels ({type(error).__name__}: {error}); using PyTorch's "
            "native norm kernels, which are slower on channels_last_3d input. Install a C++ compiler and "
            "`pip install ninja` to enable them, or set ADANORM_CPU_KERNEL=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _kernels_module()


_library: Optional[str] = None  # the shared library cpu_kernels() loaded


def _registered() -> bool:
    """Whether the adanorm operators are registered in this process."""
    return bool(torch._C._jit_get_schemas_for_operator("adanorm::fused_norm"))


def _kernels_module() -> ModuleType:
    """The registered operators as the module ``cpu_kernels()`` returns (fake kernels registered)."""
    _register_fake_kernels()
    kernels = ModuleType("adanorm._cpu_kernels", "adanorm's compiled CPU kernels: torch.ops.adanorm operators")
    kernels.__file__ = _library or next(
        (path for path in sorted(torch.ops.loaded_libraries) if Path(path).name == f"{_EXTENSION}.so"), None)
    kernels.fused_norm = torch.ops.adanorm.fused_norm.default
    kernels.native_group_norm = torch.ops.adanorm.native_group_norm.default
    kernels.blend_running_stats = torch.ops.adanorm.blend_running_stats.default
    return kernels


def _dense_format(input: Tensor) -> torch.memory_format:
    """The layout the compiled kernels give their output (``dense_layout`` in norm_cpu.cpp): channels-last
    for input dense in channels_last(_3d) and not also contiguous, or a strided view that native
    kernels lay out channels-last; else contiguous."""
    if input.dim() in (4, 5) and not input.is_contiguous():
        channels_last = torch.channels_last_3d if input.dim() == 5 else torch.channels_last
        if input.is_contiguous(memory_format=channels_last) or suggest_memory_format(input) == channels_last:
            return channels_last
    return torch.contiguous_format


# Fake kernels: output shapes, dtypes and layouts without running the kernels (FakeTensor, dynamo,
# AOTAutograd, torch.export). Arguments are those of the operators' schemas in norm_cpu.cpp.
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


def _fake_native_group_norm(input, weight, bias, groups, eps):
    return torch.empty_like(input, memory_format=suggest_memory_format(input))  # as at::group_norm lays it out


def _fake_blend_running_stats(running_mean, running_var, batch_mean, batch_var, momentum, momentum_tensor,
                              nonfinite_skips):
    return None  # mutates its (a!), (b!), (c!) arguments only


_FAKE_KERNELS = {
    "adanorm::fused_norm": _fake_fused_norm,
    "adanorm::_fused_norm_forward": _fake_fused_norm_forward,
    "adanorm::_fused_norm_backward": _fake_fused_norm_backward,
    "adanorm::native_group_norm": _fake_native_group_norm,
    "adanorm::blend_running_stats": _fake_blend_running_stats,
}


def _register_fake_kernels() -> None:
    """Register the fake kernels once the operators exist, once per process (the C++ library names
    this module in ``set_python_module``, so FakeTensor imports it when it first meets them)."""
    for name, fake in _FAKE_KERNELS.items():
        if not torch._library.simple_registry.singleton.find(name).fake_impl.kernels:
            torch.library.register_fake(name, fake)


@contextmanager
def _build_lock(build_directory: Path) -> Iterator[None]:
    """Hold adanorm's lock on the build directory while ``cpp_extension.load`` builds or loads there,
    after removing any ``lock`` file torch left behind.

    torch serializes builds with a ``lock`` file that only a build that ends normally removes: after
    one killed part-way (Ctrl-C, SIGKILL, a preempted job) every later process waits for it forever.
    The kernel releases an flock when its holder dies, however it dies, and adanorm holds this one
    whenever torch's lock file can exist, so a lock file found while holding it is stale. A live
    holder (a process building right now) is waited for, up to ADANORM_BUILD_WAIT seconds. Without
    flock (not POSIX, some network file systems) only torch's own lock file serializes builds.
    """
    try:
        import fcntl

        descriptor = os.open(build_directory / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        if _flock(descriptor, build_directory):
            try:
                (build_directory / "lock").unlink()
            except FileNotFoundError:
                pass
        yield
    finally:
        os.close(descriptor)  # releases the flock


def _flock(descriptor: int, build_directory: Path) -> bool:
    """Lock ``descriptor`` exclusively, waiting for a live holder at most ADANORM_BUILD_WAIT seconds
    (then ``BuildWaitExpired``); False where the file system does not support flock."""
    import fcntl

    wait = float(os.environ.get("ADANORM_BUILD_WAIT", DEFAULT_BUILD_WAIT_S))
    deadline = time.monotonic() + wait
    announced = False
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError:
            return False
        if time.monotonic() >= deadline:
            raise BuildWaitExpired(
                f"adanorm: waited {wait:g} s for another process to finish building its CPU kernels in "
                f"{build_directory} (it holds {build_directory / BUILD_LOCK}); using PyTorch's native norm kernels. "
                "If no process is building (a hung compiler, a stopped job), end that process; set "
                "ADANORM_BUILD_WAIT to wait longer, or ADANORM_CPU_KERNEL=0 to skip the compiled kernels."
            )
        if not announced:
            print(f"adanorm: waiting for another process to finish building its CPU kernels ({build_directory})...",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(0.2)


def prefer_fused_cpu(input: Tensor, num_groups: Optional[int]) -> bool:
    """Whether ``fused_norm`` is the faster kernel for this input, with statistics per (sample, group)
    for ``num_groups`` groups (instance, group, layer) or over the batch for None (batch mode): on a
    CPU tensor of a supported dtype, outside autocast (whose dtype policy the native ops carry).
    Captured code (compile, export, tracing) never asks: ``dispatch`` routes it to native ops first."""
    if not input.is_cpu or input.dim() < 3:  # cheapest tests first: this runs on every call of a layer
        return False
    numel = input.numel()
    if num_groups is None:
        # More than one value per channel, or native batch norm's error must be raised instead.
        worth_it = numel >= MIN_NUMEL_BATCH and numel > input.shape[1]
    elif is_channels_last(input):
        worth_it = numel >= (MIN_NUMEL_LAYER_CHANNELS_LAST if num_groups == 1 else MIN_NUMEL_PER_SAMPLE_CHANNELS_LAST)
    else:
        worth_it = numel >= MIN_NUMEL_PER_SAMPLE_CONTIGUOUS or (
            numel >= MIN_NUMEL_PER_SAMPLE_FEW_GROUPS and input.shape[0] * num_groups < torch.get_num_threads())
    return (
        worth_it
        and input.dtype in KERNEL_DTYPES
        and not torch.is_autocast_enabled("cpu")
        and cpu_kernels() is not None
    )


def fused_norm(
    input: Tensor,
    num_groups: Optional[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
) -> Tensor:
    """Normalize with statistics of the current input: per (sample, group) for ``num_groups`` groups,
    or per channel over the batch (``num_groups=None``, batch mode), updating running statistics
    in place when given. Output keeps the input's layout. Call only where ``prefer_fused_cpu``.
    """
    groups = 0 if num_groups is None else num_groups
    return cpu_kernels().fused_norm(input, weight, bias, groups, eps, running_mean, running_var, momentum)


def blend_running_stats(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
                        factor: Union[float, Tensor], nonfinite_skips: Optional[Tensor]) -> None:
    """``running_stats.blend`` as one operator call (its tensor operations cost about 40 µs per step
    here, several times a small layer's kernel). Call only where ``cpu_kernels()`` built, on
    contiguous CPU statistics."""
    tensor_factor = factor if isinstance(factor, Tensor) else None
    cpu_kernels().blend_running_stats(running_mean, running_var, batch_mean, batch_var,
                                      0.0 if tensor_factor is not None else factor, tensor_factor, nonfinite_skips)


def native_group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float) -> Tensor:
    """``torch.group_norm`` (its kernels and numbers) with a backward that always computes the input
    gradient, so that torch 2.13's channels-last backward cannot crash. Call only where
    ``cpu_kernels()`` built; under ``torch.compile`` call ``torch.ops.adanorm.native_group_norm``."""
    return cpu_kernels().native_group_norm(input, weight, bias, num_groups, eps)


if _registered():
    _register_fake_kernels()  # the library was loaded before this module (a reload, or FakeTensor importing it)
