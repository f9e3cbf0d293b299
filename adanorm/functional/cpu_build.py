"""Compiling and loading the library of the CPU kernels (``adanorm/csrc``), under a build lock that a
killed build cannot leave behind.

``torch.utils.cpp_extension.load`` compiles the sources with ninja into its build directory (under
``TORCH_EXTENSIONS_DIR``) and loads the library, whose ``TORCH_LIBRARY`` block registers the
operators (``cpu_ops``). ninja rebuilds whenever a source, a header it includes (compiler depfiles)
or the compile command changes; the command names the torch version, so a build is never loaded
into another torch than the one it was compiled against.
"""
from __future__ import annotations

import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from adanorm.functional._compat import extension_build_directory, extension_lock_outlives_a_killed_build

try:
    import fcntl
except ImportError:  # not POSIX: only torch's own lock file serializes builds
    fcntl = None

_SOURCE_DIRECTORY = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = (_SOURCE_DIRECTORY / "norm_cpu_kernels.cpp", _SOURCE_DIRECTORY / "norm_cpu_ops.cpp",
           _SOURCE_DIRECTORY / "vector_math.cpp")
"""Translation units of the library; the headers they include are tracked by ninja."""
# Instruction-set flags follow the vector level PyTorch itself dispatches to, never -march=native: a
# build cached in a shared home directory must also run on the other nodes of a cluster. The level
# is part of the extension's name, so nodes with different levels keep separate builds.
_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability().lower()
EXTENSION = f"adanorm_norm_cpu_{_CPU_CAPABILITY}"
_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}.get(_CPU_CAPABILITY, [])
# torch's headers are system includes, which compiler depfiles leave out: naming the version in the
# command is what makes ninja rebuild after torch is upgraded in place.
_TORCH_VERSION_FLAG = "-DADANORM_TORCH_VERSION=" + re.sub(r"[^0-9A-Za-z.+_]", "_", torch.__version__)
# -fno-trapping-math lets GCC vectorize the activations' per-element selects (a multiply or divide on one
# side of a select is otherwise never executed speculatively, in case it traps); values and rounding are
# unchanged, since floating-point exceptions are masked in every PyTorch process.
CFLAGS = ("-O3", "-fopenmp", "-fno-trapping-math", *_ISA_FLAGS, _TORCH_VERSION_FLAG)
BUILD_LOCK = "adanorm.lock"
"""adanorm's lock file in the build directory, next to torch's ``lock``."""


class BuildWaitExpired(Exception):
    """Another process held the build lock for longer than the caller was willing to wait."""


def build_and_load(wait_s: float) -> None:
    """Compile the library where it is missing or out of date, and load it, which registers the
    operators. A build by another process is waited for at most ``wait_s`` seconds, then
    ``BuildWaitExpired``; any other failure (no compiler, no ninja) raises what ``cpp_extension`` raised.
    Call once per process: loading the library a second time would register the operators again,
    which aborts the process."""
    from torch.utils import cpp_extension

    build_directory = extension_build_directory(EXTENSION)
    if not (build_directory / f"{EXTENSION}.so").exists():
        print("adanorm: compiling its CPU kernels (once per machine and torch version, about a minute)...",
              file=sys.stderr, flush=True)
    with _build_lock(build_directory, wait_s):
        # A plain library, not a Python module: loading it registers the operators.
        cpp_extension.load(name=EXTENSION, sources=[str(source) for source in SOURCES],
                           build_directory=str(build_directory), extra_cflags=list(CFLAGS), is_python_module=False,
                           verbose=False)


@contextmanager
def _build_lock(build_directory: Path, wait_s: float) -> Iterator[None]:
    """Hold adanorm's lock on the build directory while ``cpp_extension.load`` builds or loads there,
    after removing any stale ``lock`` file torch left behind.

    Up to torch 2.13 torch serializes builds with a ``lock`` file that only a build that ends normally
    removes: after one killed part-way (Ctrl-C, SIGKILL, a preempted job) every later process waits
    for it forever. The kernel releases an flock when its holder dies, however it dies, and adanorm
    holds this one whenever torch's lock file can exist, so a lock file found while holding it is
    stale (``_compat.extension_lock_outlives_a_killed_build``). From torch 2.14 torch's own lock is an
    flock too, and its file is left alone. A live holder (a process building right now) is waited for,
    up to ``wait_s`` seconds, where torch alone would wait without end. Without flock (not POSIX, some
    network file systems) only torch's own lock serializes builds.
    """
    if fcntl is None:
        yield
        return
    try:
        descriptor = os.open(build_directory / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        if _flock(descriptor, build_directory, wait_s) and extension_lock_outlives_a_killed_build():
            try:
                (build_directory / "lock").unlink()
            except FileNotFoundError:
                pass
        yield
    finally:
        os.close(descriptor)  # releases the flock


def _flock(descriptor: int, build_directory: Path, wait_s: float) -> bool:
    """Lock ``descriptor`` exclusively, waiting for a live holder at most ``wait_s`` seconds (then
    ``BuildWaitExpired``); False where the file system does not support flock."""
    deadline = time.monotonic() + wait_s
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
                f"adanorm: waited {wait_s:g} s for another process to finish building its CPU kernels in "
                f"{build_directory} (it holds {build_directory / BUILD_LOCK}); using PyTorch's native norm kernels. "
                "If no process is building (a hung compiler, a stopped job), end that process; set "
                "ADANORM_BUILD_WAIT to wait longer, or ADANORM_CPU_KERNEL=0 to skip the compiled kernels."
            )
        if not announced:
            print(f"adanorm: waiting for another process to finish building its CPU kernels ({build_directory})...",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(0.2)
