"""The compiled CPU kernels (adanorm/csrc/norm_cpu_kernels.cpp via adanorm.functional.cpu_fused).

References are PyTorch's own kernels (F.batch_norm, F.group_norm) and float64 math; shapes are
chosen so the kernels' chunking (several tasks per sample and per row), float-block flushing and
per-sample units are all reached. The module-level tests in test_forced_modes.py and
test_fast_paths.py also run on these kernels (the ``cpu_backend`` fixture).
"""
from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adanorm import AdaptiveNorm3d
from adanorm.functional import cpu_fused, cpu_ops, dispatch
from adanorm.functional.cpu_fused import fused_norm
from adanorm.functional.dispatch import cpu_kernels, prefer_fused_cpu

TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-5, 1e-4), torch.bfloat16: (6e-2, 3e-2), torch.float16: (1e-2, 1e-2)}
LAYOUTS = ["contiguous", "channels_last"]
# (shape, groups): groups None is batch mode. Shapes reach: one sample, odd sizes, C not a multiple
# of the vector width, several channels-last tasks per sample (S·C > 2^15) and several contiguous
# pieces per row (S > 2^15), (sample, group) blocks that share out evenly over two threads (units
# side by side) or do not (3 blocks), and float64 input above the whole-batch size (units in turn).
CASES = [
    ((2, 6, 3, 4, 5), None), ((2, 6, 3, 4, 5), 6), ((2, 6, 3, 4, 5), 3), ((2, 6, 3, 4, 5), 1),
    ((1, 8, 4, 4, 4), None), ((1, 8, 4, 4, 4), 8),
    ((3, 5, 2, 3, 7), 5), ((2, 7, 5, 6), None), ((2, 7, 5, 6), 7), ((4, 3, 17), 3), ((4, 3, 17), None),
    ((1, 3, 40, 40, 25), None), ((1, 3, 40, 40, 25), 3), ((2, 64, 12, 12, 12), 64), ((2, 64, 12, 12, 12), 8),
    ((3, 4, 24, 64, 64), 1),
]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    kernels = cpu_kernels()
    assert kernels is not None, "the compiled CPU kernels did not build (see the warning)"
    return kernels


def _memory_format(layout: str, dim: int) -> torch.memory_format:
    if layout == "contiguous" or dim < 4:
        return torch.contiguous_format
    return torch.channels_last_3d if dim == 5 else torch.channels_last


def _data(shape, dtype, layout, mean=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    fmt = _memory_format(layout, len(shape))
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + mean).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.rand(shape[1], generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(shape[1], generator=generator, dtype=torch.float64).to(dtype)
    return x, dy, weight, bias


def _native(x, groups, weight, bias, running_mean=None, running_var=None):
    if groups is None:
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    return F.group_norm(x, groups, weight, bias, 1e-5)


def _step(norm, x, dy, weight, bias, **kwargs):
    leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, weight, bias)]
    y = norm(leaves[0], *kwargs.pop("args"), leaves[1], leaves[2], **kwargs)
    y.backward(dy)
    return [y] + [t.grad for t in leaves]


@pytest.mark.parametrize(
    "case,dtype,layout",
    list(itertools.product(CASES, [torch.float64, torch.float32, torch.bfloat16, torch.float16], LAYOUTS)),
    ids=str,
)
def test_matches_native_kernels(case, dtype, layout):
    _check_against_native(*case, dtype, layout)


def _check_against_native(shape, groups, dtype, layout):
    x, dy, weight, bias = _data(shape, dtype, layout)
    # The reference is the native kernels in float64: in float32 native channels-last group norm is
    # itself off by ~1e-5, and in bfloat16/float16 it rounds differently.
    reference_dtype = torch.float64
    stats = (torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype))
    native_stats = tuple(t.to(reference_dtype) for t in stats)
    fused = _step(fused_norm, x, dy, weight, bias, args=(groups,), eps=1e-5,
                  running_mean=stats[0] if groups is None else None, running_var=stats[1] if groups is None else None)
    reference = _step(
        lambda x_, g, w, b: _native(x_, g, w, b, *native_stats if groups is None else (None, None)),
        x.to(reference_dtype), dy.to(reference_dtype), weight.to(reference_dtype), bias.to(reference_dtype), args=(groups,),
    )
    atol, rtol = TOL[dtype]
    fmt = _memory_format(layout, len(shape))
    for name, got, want in zip(["output", "grad_input", "grad_weight", "grad_bias"], fused, reference):
        assert got.dtype == dtype, name
        tolerance = (atol * shape[0] * 32, rtol) if name in ("grad_weight", "grad_bias") and dtype != torch.float64 else (atol, rtol)
        torch.testing.assert_close(got.double(), want.double(), atol=tolerance[0], rtol=tolerance[1],
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert fused[0].is_contiguous(memory_format=fmt) and fused[1].is_contiguous(memory_format=fmt)
    if groups is None:
        for got, want in zip(stats, native_stats):
            torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


# Channel counts the channels-last passes compile a fixed row width for (norm_cpu_kernels.cpp,
# channels_last_sums/affine), and run-time widths beside them.
FIXED_WIDTHS = (8, 16, 32, 48, 64, 96, 128, 256)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels", FIXED_WIDTHS + (24, 40), ids=lambda c: f"C{c}")
@pytest.mark.parametrize("grouping", ["batch", "group", "layer"])
def test_every_channels_last_row_width_matches_native(grouping, channels, dtype):
    # 495 rows per sample: the sums flush their float blocks (256 rows) mid-sample, and at 256
    # channels a sample spans several tasks.
    groups = {"batch": None, "group": channels // 4, "layer": 1}[grouping]
    _check_against_native((2, channels, 5, 9, 11), groups, dtype, "channels_last")


@pytest.mark.slow  # 20 s to 2.5 min per case on 2 cores
@pytest.mark.parametrize("groups,layout", list(itertools.product([None, 8, 2, 1], LAYOUTS)))
def test_gradcheck_and_gradgradcheck(groups, layout):
    x, _, weight, bias = _data((2, 8, 3, 4, 5), torch.float64, layout)
    inputs = tuple(t.detach().requires_grad_() for t in (x, weight, bias))
    function = lambda x_, w, b: fused_norm(x_, groups, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(function, inputs)
    # Second derivatives (gradient penalties) go through the native kernels' double backward.
    assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [None, 16, 4, 1])
def test_large_mean_keeps_float32_precision(groups, layout):
    """Shifted sums: a mean of 1e4 with unit spread must not cost float32 its digits (native
    channels-last group norm is off by ~1e3 here; E[x²]−E[x]² would be too)."""
    x, dy, weight, bias = _data((2, 16, 16, 16, 16), torch.float32, layout, mean=1e4)
    expected = _native(x.double(), groups, weight.double(), bias.double())
    torch.testing.assert_close(fused_norm(x, groups, weight, bias, 1e-5).double(), expected, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [None, 8, 1])
def test_inference_path_equals_the_graph_path(groups, layout):
    """Without a graph to record (no_grad, or nothing requiring grad) the kernels skip the autograd
    node; outputs and running-statistics updates must be the same bits as with one."""
    x, _, weight, bias = _data((2, 8, 6, 6, 6), torch.float32, layout)
    batch = groups is None
    results = []
    for graph in (True, False):
        stats = (torch.zeros(8), torch.ones(8)) if batch else (None, None)
        with torch.set_grad_enabled(graph):
            output = fused_norm(x.detach().requires_grad_(graph), groups, weight, bias, 1e-5, *stats)
        assert (output.grad_fn is not None) == graph
        results.append((output,) + (stats if batch else ()))
    assert results[1][0].is_contiguous(memory_format=_memory_format(layout, 5))
    for with_graph, without in zip(*results):
        assert torch.equal(with_graph.detach(), without)
    if batch:
        assert not torch.equal(results[1][2], torch.ones(8))  # the inference path updated the running variance too


@pytest.mark.parametrize("layout", LAYOUTS)
def test_results_do_not_depend_on_thread_count(layout):
    x, dy, weight, bias = _data((2, 16, 24, 24, 24), torch.float32, layout)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(_step(fused_norm, x, dy, weight, bias, args=(4,), eps=1e-5))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert torch.equal(got, want)


def test_input_that_is_not_dense_is_made_dense_first():
    x, dy, weight, bias = _data((2, 6, 8, 8, 16), torch.float32, "contiguous")
    strided = x[..., ::2]
    torch.testing.assert_close(fused_norm(strided, 3, weight, bias, 1e-5), F.group_norm(strided, 3, weight, bias, 1e-5))


def test_groups_that_do_not_divide_the_channels_are_rejected():
    with pytest.raises(RuntimeError, match="4 channels do not split into 3 groups"):
        fused_norm(torch.randn(2, 4, 3, 3, 3), 3, None, None, 1e-5)


def test_dispatch_rules(monkeypatch):
    channels_last = torch.randn(2, 32, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    contiguous = torch.randn(2, 32, 8, 16, 16)
    assert prefer_fused_cpu(channels_last, num_groups=32)
    assert not prefer_fused_cpu(contiguous, num_groups=32)  # 2^17 values: native's lower fixed cost wins
    assert not prefer_fused_cpu(torch.randn(2, 32, 16, 16, 16), num_groups=32)  # 2^18: still native
    assert prefer_fused_cpu(torch.randn(2, 64, 16, 16, 16), num_groups=32)  # 2^19: the cache-local kernels win
    assert prefer_fused_cpu(contiguous, num_groups=None)
    assert not prefer_fused_cpu(torch.randn(2, 8, 4, 4, 4), num_groups=None)  # small: native overhead wins
    assert not prefer_fused_cpu(channels_last.to(torch.int32), num_groups=32)
    # Channels-last layer mode: native group norm's channels-last kernel wins below 2^17 values.
    assert not prefer_fused_cpu(channels_last, num_groups=1)
    assert not prefer_fused_cpu(torch.randn(2, 32, 8, 8, 16).contiguous(memory_format=torch.channels_last_3d), num_groups=1)
    assert prefer_fused_cpu(torch.randn(2, 32, 8, 16, 16).contiguous(memory_format=torch.channels_last_3d), num_groups=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not prefer_fused_cpu(channels_last, num_groups=32)
    # Native group norm runs a (sample, group) pair per thread: fewer pairs than threads leave some idle.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert prefer_fused_cpu(contiguous, num_groups=1)  # 2 pairs, 4 threads
    assert not prefer_fused_cpu(contiguous, num_groups=2)  # 4 pairs
    assert not prefer_fused_cpu(torch.randn(2, 32, 4, 8, 8), num_groups=1)  # small: native overhead wins


def test_traced_model_stays_correct():
    """torch.jit.trace (and ONNX export, which traces) only records dispatcher ops: the layer must take
    native kernels there, or the traced graph would return the example input's output forever."""
    layer = AdaptiveNorm3d(32, mode="instance")
    example = torch.randn(2, 32, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    traced = torch.jit.trace(layer, example)
    other = torch.randn(2, 32, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d) * 3 + 1
    torch.testing.assert_close(traced(other), layer(other))


def test_torch_compile_traces_the_layer_without_graph_breaks():
    layer = AdaptiveNorm3d(32, mode="instance")
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fullgraph: a graph break would raise
    x = torch.randn(2, 32, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(compiled(x), layer(x))


def test_layer_uses_the_fused_kernels_on_channels_last_input(monkeypatch):
    calls = []

    def spy(input, num_groups, *args, **kwargs):
        calls.append(num_groups)
        return fused_norm(input, num_groups, *args, **kwargs)

    monkeypatch.setattr(cpu_fused, "fused_norm", spy)
    x = torch.randn(2, 32, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    AdaptiveNorm3d(32, mode="instance")(x).sum().backward()
    AdaptiveNorm3d(32, mode="batch")(torch.randn(4, 32, 16, 16, 16))  # 2^19 values: batch statistics fused too
    assert calls == [32, None]


@pytest.mark.slow
def test_disabled_by_environment_variable():
    code = "from adanorm.functional.dispatch import cpu_kernels; print(cpu_kernels() is None)"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ADANORM_CPU_KERNEL": "0"},
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


@pytest.mark.slow
def test_calls_before_the_operators_are_loaded_say_how_to_load_them():
    code = ("import torch; from adanorm.functional import cpu_fused\n"
            "try:\n    cpu_fused.fused_norm(torch.randn(2, 4, 3), 2, None, None, 1e-5)\n"
            "except RuntimeError as error:\n    print(error)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "not loaded in this process: adanorm.functional.dispatch.cpu_kernels() loads them" in result.stdout


@pytest.mark.slow
def test_missing_toolchain_warns_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_ops, "registered", lambda: False)  # as in a process that has not loaded them yet
    cpu_kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not compile its CPU kernels.*pip install ninja"):
            assert cpu_kernels() is None
        x = torch.randn(2, 8, 16, 16, 16).contiguous(memory_format=torch.channels_last_3d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert not prefer_fused_cpu(x, num_groups=4)
    finally:
        cpu_kernels.cache_clear()


def test_unreadable_build_wait_warns_and_waits_the_default(monkeypatch):
    monkeypatch.setenv("ADANORM_BUILD_WAIT", "ten minutes")
    with pytest.warns(RuntimeWarning, match="ADANORM_BUILD_WAIT='ten minutes' is not a number of seconds"):
        assert dispatch._build_wait_s() == dispatch.DEFAULT_BUILD_WAIT_S
    monkeypatch.setenv("ADANORM_BUILD_WAIT", "2.5")
    assert dispatch._build_wait_s() == 2.5


def test_environment_switches_are_read_in_dispatch_only():
    """dispatch.py is the one place that reads the kernel switches; the kernel modules get values passed in."""
    import adanorm.build
    import adanorm.functional

    def reads_environment(path: Path) -> bool:
        return any(isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                   or isinstance(node, ast.Name) and node.id in ("environ", "getenv")
                   for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))

    functional = Path(adanorm.functional.__file__).resolve().parent
    readers = sorted(str(path.relative_to(functional.parent)) for path in [*functional.glob("*.py"), Path(adanorm.build.__file__)]
                     if path.name != "dispatch.py" and reads_environment(path))
    assert not readers, f"environment read outside adanorm/functional/dispatch.py: {readers}"
