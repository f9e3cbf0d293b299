"""Failures of the core that no numeric test sees (issue #14, points 6, 7 and 9): a native backward
that kills the process, a kernel build that waits forever, and edge inputs (mixed dtypes, an empty
batch, Inf) where adanorm must give what the native modules give.

The crashing backward and the builds run in subprocesses, so that a regression fails its test
instead of taking pytest down or hanging it. The build tests use their own TORCH_EXTENSIONS_DIR and never touch the
cached build; they share one real build (``first_builds``, about a minute), marked ``slow``.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import adanorm
from adanorm.functional import adaptive_norm, cpu_build
from adanorm.functional._compat import (
    NATIVE_GROUP_NORM_BACKWARD_FIXED,
    extension_build_directory,
    extension_lock_outlives_a_killed_build,
)

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _python(code: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def _report(result: subprocess.CompletedProcess) -> str:
    return f"return code {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


# Point 6 -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_canary_native_channels_last_group_norm_backward_crashes_before_torch_2_14():
    """adanorm routes around this crash (``_compat.NATIVE_GROUP_NORM_BACKWARD_FIXED``), which torch 2.14
    fixed; the flag must say what the torch that runs here does."""
    result = _python("""
        import torch, torch.nn.functional as F
        x = torch.randn(2, 8, 2, 2, 2).contiguous(memory_format=torch.channels_last_3d)
        w = torch.ones(8, requires_grad=True)
        b = torch.zeros(8, requires_grad=True)
        F.group_norm(x, 4, w, b).sum().backward()
    """, timeout=120)
    if NATIVE_GROUP_NORM_BACKWARD_FIXED:
        assert result.returncode == 0, _report(result)
    else:
        assert result.returncode != 0, (
            f"torch {torch.__version__} fixed the channels-last group_norm backward segfault: correct "
            "NATIVE_GROUP_NORM_BACKWARD_FIXED in adanorm/functional/_compat.py")


_FROZEN_INPUT_SCRIPT = """
    import torch
    import torch.nn.functional as F
    import adanorm
    from adanorm.functional import cpu_fused, dispatch, groups_for_mode

    def check(label, layer, x, input_requires_grad, dtype=torch.float32):
        print(label, flush=True)  # the last line printed names the case that crashed
        x = x.to(dtype)
        dy = torch.randn_like(x)
        output = layer(x.detach().requires_grad_(input_requires_grad))
        # Gradients of the parameters only: what backward() computes for a frozen input.
        grads = torch.autograd.grad(output, [layer.weight, layer.bias], dy)
        groups = groups_for_mode(layer.mode, x.shape[1], layer.num_groups)
        w, b = (p.detach().double().requires_grad_() for p in (layer.weight, layer.bias))
        expected = F.group_norm(x.contiguous().double(), groups, w, b, layer.eps)
        expected_grads = torch.autograd.grad(expected, [w, b], dy.contiguous().double())
        tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
        assert output.dtype == dtype, label
        torch.testing.assert_close(output.double(), expected, atol=tolerance, rtol=tolerance)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got.double(), want, atol=tolerance * x[:, 0].numel(), rtol=tolerance)
        # The layout native group norm gives (its forward alone does not crash).
        assert output.stride() == F.group_norm(x, groups, layer.weight, layer.bias).stride(), label

    def use(backend):  # switched as conftest's cpu_backend fixture does
        dispatch.cpu_kernels = (lambda: None) if backend == "native" else cpu_kernels
        for name, value in thresholds.items():
            setattr(dispatch, name, 0 if backend == "fused" else value)

    cpu_kernels = dispatch.cpu_kernels
    assert cpu_kernels() is not None, "the compiled kernels did not build"
    thresholds = {name: getattr(dispatch, name) for name in dir(dispatch) if name.startswith("MIN_NUMEL_")}
    for backend in ("native", "compiled", "fused"):
        use(backend)
        for shape in [(2, 8, 2, 2, 2), (1, 64, 4, 4, 4), (2, 64, 1, 2, 1), (2, 8, 2, 2), (1, 64, 4, 4), (2, 16, 1, 3)]:
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d if len(shape) == 5 else torch.channels_last)
            for mode in ("instance", "group", "layer"):
                for input_requires_grad in [False] if backend == "native" else [False, True]:
                    check(f"{backend}: {shape} {mode}, input requires grad: {input_requires_grad}",
                          adanorm.AdaptiveNorm(shape[1], mode=mode), x, input_requires_grad)
        # A strided view of a channels-last tensor: native group norm lays it out channels-last, then crashes.
        view = torch.randn(2, 8, 4, 4, 8).contiguous(memory_format=torch.channels_last_3d)[..., ::2]
        check(f"{backend}: strided view", adanorm.AdaptiveNorm(8, mode="group"), view, False)
        x = torch.randn(2, 8, 2, 2, 2).contiguous(memory_format=torch.channels_last_3d)
        check(f"{backend}: bfloat16", adanorm.AdaptiveNorm(8, mode="group"), x, False, torch.bfloat16)
        print(f"{backend}: gradient penalty", flush=True)
        layer = adanorm.AdaptiveNorm3d(8, mode="group")
        (grad,) = torch.autograd.grad(layer(x).pow(2).sum(), [layer.weight], create_graph=True)
        grad.sum().backward()
    print("torch.compile", flush=True)  # aot_eager runs the traced native ops as they are
    use("compiled")
    layer = adanorm.AdaptiveNorm3d(8, mode="layer")
    output = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    output.sum().backward()
    assert output.is_contiguous(memory_format=torch.channels_last_3d)
    print("empty batch", flush=True)  # the compiled kernels' sizes divide by N·C
    try:
        cpu_fused.fused_norm(torch.randn(0, 8, 4, 4, 4), 4, None, None, 1e-5)
        raise AssertionError("the compiled kernels took an empty batch")
    except RuntimeError as error:
        assert "is empty" in str(error)
    print("done", flush=True)
"""


@pytest.mark.slow
def test_parameter_gradients_without_input_gradient_do_not_crash():
    """Parameters that want gradients while the input does not (a frozen encoder in front, or
    ``autograd.grad`` over parameters), every per-sample mode, 4-D and 5-D channels-last, under
    torch.compile too: no crash, and outputs and parameter gradients those of native group norm on
    contiguous input. One subprocess runs every backend, switched as conftest's ``cpu_backend``
    does: native (no compiled kernels), compiled (default thresholds: small inputs take the native
    kernels through ``native_group_norm``) and fused (the compiled kernels take every input). The
    native backend skips ``autograd.grad`` with an input that requires grad: without the compiled
    kernels adanorm leaves native group norm as it is there, rather than slow down every training step.
    """
    result = _python(_FROZEN_INPUT_SCRIPT, timeout=300)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("done"), _report(result)


# Point 7 -------------------------------------------------------------------------------------

_LOAD_SCRIPT = """
    import warnings
    import torch
    from adanorm.functional.dispatch import cpu_kernels

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = cpu_kernels()
    for warning in caught:
        print("WARNING", warning.category.__name__, warning.message)
    if kernels is not None:
        x = torch.randn(2, 8, 4, 4, 4)
        torch.testing.assert_close(kernels.fused_norm(x, None, None, 4, 1e-5, None, None, 0.1), torch.group_norm(x, 4))
    print("kernels:", kernels is not None)
"""
_BUILD_TIMEOUT_S = 480  # a build takes about a minute on two cores; CI machines may be slower


def _build_directory(extensions_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions_dir))
    return extension_build_directory(cpu_build.EXTENSION)


@pytest.fixture(scope="module")
def first_builds(tmp_path_factory):
    """Two processes that start loading the kernels at once on an empty TORCH_EXTENSIONS_DIR."""
    extensions_dir = tmp_path_factory.mktemp("torch_extensions")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    processes = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_LOAD_SCRIPT)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return extensions_dir, results


@pytest.mark.slow
def test_concurrent_first_builds_both_get_the_kernels(first_builds):
    _, results = first_builds
    for result in results:
        assert result.returncode == 0 and "kernels: True" in result.stdout and "WARNING" not in result.stdout, \
            _report(result)


@pytest.mark.slow
def test_lock_left_by_a_killed_build_does_not_hang(first_builds, tmp_path, monkeypatch):
    """A build killed part-way leaves torch's ``lock`` file: the next process must not wait for it. Up to
    torch 2.13 that file is the lock itself (``FileBaton``), which adanorm removes as stale; from 2.14 torch
    holds an flock on it (``FileLock``), which dies with the build, and the file stays."""
    built_dir, _ = first_builds
    extensions_dir = tmp_path / "torch_extensions"
    shutil.copytree(built_dir, extensions_dir)  # the build is done: loading it again is quick
    build_directory = _build_directory(extensions_dir, monkeypatch)
    lock_outlives_its_holder = extension_lock_outlives_a_killed_build()
    killed = _python(f"""
        import fcntl, os, signal
        from torch.utils import cpp_extension
        # What a build killed by SIGKILL leaves: torch's lock file, and adanorm's lock, which dies with it.
        descriptor = os.open({str(build_directory / cpu_build.BUILD_LOCK)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        if {lock_outlives_its_holder!r}:
            assert cpp_extension.FileBaton({str(build_directory / "lock")!r}).try_acquire()
        else:
            cpp_extension.FileLock({str(build_directory / "lock")!r}).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """, timeout=60)
    assert killed.returncode == -9 and (build_directory / "lock").exists(), _report(killed)
    result = _python(_LOAD_SCRIPT, timeout=_BUILD_TIMEOUT_S, TORCH_EXTENSIONS_DIR=str(extensions_dir))
    assert result.returncode == 0 and "kernels: True" in result.stdout and "WARNING" not in result.stdout, \
        _report(result)
    if lock_outlives_its_holder:
        assert not (build_directory / "lock").exists()


@pytest.mark.slow
def test_wait_for_another_build_is_bounded(tmp_path, monkeypatch):
    """A live process holding the build (a hung compiler, a stopped job) is waited for only
    ADANORM_BUILD_WAIT seconds; then the native kernels, with a warning naming the lock."""
    build_directory = _build_directory(tmp_path, monkeypatch)
    lock = build_directory / cpu_build.BUILD_LOCK
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        result = _python(_LOAD_SCRIPT, timeout=60, TORCH_EXTENSIONS_DIR=str(tmp_path), ADANORM_BUILD_WAIT="1")
    finally:
        os.close(descriptor)
    assert result.returncode == 0 and "kernels: False" in result.stdout, _report(result)
    assert "WARNING RuntimeWarning adanorm: waited 1 s" in result.stdout and str(lock) in result.stdout, _report(result)
    assert "ADANORM_BUILD_WAIT" in result.stdout


# Point 9 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_identity_mode_keeps_the_input_dtype(dtype):
    """Low-precision input with float32 parameters: native norms return the input's dtype."""
    x = torch.randn(2, 8, 3, 3, 3).to(dtype)
    layer = adanorm.AdaptiveNorm3d(8, mode="identity")
    nn.init.uniform_(layer.weight, 0.5, 1.5)
    nn.init.normal_(layer.bias)
    native_dtypes = {nn.BatchNorm3d(8)(x).dtype, nn.GroupNorm(4, 8)(x).dtype}
    output = layer(x)
    assert native_dtypes == {dtype} and output.dtype == dtype
    view = (1, -1, 1, 1, 1)
    expected = (x.double() * layer.weight.double().view(view) + layer.bias.double().view(view)).to(dtype)
    torch.testing.assert_close(output, expected)
    output.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, x.float().sum((0, 2, 3, 4)))
    for weight, bias in [(layer.weight, None), (None, layer.bias)]:
        assert adaptive_norm(x, "identity", weight, bias).dtype == dtype


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("rank", [4, 5])
@pytest.mark.parametrize("mode", ["batch", "instance", "group", "layer", "identity"])
def test_empty_channels_last_batch_keeps_its_layout(mode, rank):
    """An empty batch comes back empty, with the input's strides and zero parameter gradients."""
    x = torch.randn((0, 8) + (3,) * (rank - 2)).contiguous(memory_format=CHANNELS_LAST[rank]).requires_grad_()
    layer = adanorm.AdaptiveNorm(8, mode=mode)
    output = layer(x)
    assert output.shape == x.shape and output.stride() == x.stride()
    output.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(8)) and torch.equal(layer.bias.grad, torch.zeros(8))


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_in_instance_mode_with_running_statistics(training):
    """Native InstanceNorm(track_running_stats=True) fails on an empty batch; adanorm passes it
    through in its layout and leaves the running statistics alone."""
    x = torch.randn(0, 8, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    running_mean, running_var = torch.zeros(8), torch.ones(8)
    output = adaptive_norm(x, "instance", torch.ones(8), torch.zeros(8), running_mean, running_var, training=training)
    assert output.shape == x.shape and output.stride() == x.stride()
    assert torch.equal(running_mean, torch.zeros(8)) and torch.equal(running_var, torch.ones(8))


def test_canary_native_group_norm_backward_fails_on_a_shift_without_a_scale_before_torch_2_14():
    """adanorm passes a scale of ones beside a lone shift (``dispatch._scale_beside_shift``), because torch
    before 2.14 raises here (``_compat.NATIVE_GROUP_NORM_BACKWARD_FIXED``); from 2.14 torch gives the
    gradients that a scale of ones gives."""
    x, bias = torch.randn(2, 8, 3, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)
    dy = torch.randn(2, 8, 3, 3, 3)
    if not NATIVE_GROUP_NORM_BACKWARD_FIXED:
        with pytest.raises(RuntimeError, match="does not have a device"):
            torch.autograd.grad(torch.group_norm(x, 4, None, bias, 1e-5, False), [x, bias], dy)
        return
    grads = torch.autograd.grad(torch.group_norm(x, 4, None, bias, 1e-5, False), [x, bias], dy)
    expected = torch.autograd.grad(torch.group_norm(x, 4, torch.ones(8), bias, 1e-5, False), [x, bias], dy)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def _shift_only_reference(x: torch.Tensor, mode: str, bias: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """(x − mean)/sqrt(var + eps) + β in float64, with the statistics of ``mode``."""
    batch, channels = x.shape[:2]
    dims = (0, 2, 3, 4) if mode == "batch" else None
    if mode == "batch":
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        normalized = (x - mean) / torch.sqrt(var + eps)
    else:
        grouped = x.reshape(batch, {"instance": channels, "group": groups, "layer": 1}[mode], -1)
        var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
        normalized = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return normalized + bias.view(1, -1, 1, 1, 1)


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["batch", "instance", "group", "layer"])
def test_a_shift_without_a_scale_trains_in_every_mode(mode, layout, compiled):
    """The functional API takes ``weight=None`` with a bias (a layer whose scale lives elsewhere). Native
    group norm's backward raises there before torch 2.14; every mode must give the float64 reference's output
    and gradients instead, eagerly and under torch.compile."""
    x = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def normalize(x, bias):
        return adaptive_norm(x, mode, None, bias, training=True, num_groups=4)

    run = torch.compile(normalize, backend="aot_eager", fullgraph=True) if compiled else normalize
    dy = torch.randn(x.shape, dtype=torch.float64)
    output = run(x, bias)
    grads = torch.autograd.grad(output, [x, bias], dy)
    reference_x, reference_bias = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    expected = _shift_only_reference(reference_x, mode, reference_bias, 4, 1e-5)
    torch.testing.assert_close(output, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, [reference_x, reference_bias], dy)):
        torch.testing.assert_close(got, want)


def _nonfinite(t: torch.Tensor) -> tuple:
    return t.isnan(), t.isposinf(), t.isneginf()


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inf_in_batch_mode_gives_native_statistics(layout):
    """Which running-statistics and output entries are Inf or NaN matches nn.BatchNorm3d exactly:
    an Inf at the value the compiled kernels shift their sums by must not become NaN."""
    x = torch.randn(4, 6, 3, 4, 5)
    x[1, 0, 0, 0, 0] = float("inf")  # the first value of a (sample, channel): the kernels' shift
    x[2, 1, 1, 2, 3] = float("-inf")
    x[0, 2, 0, 0, 0], x[3, 2, 2, 1, 0] = float("inf"), float("-inf")
    x[2, 3, 0, 0, 0] = float("nan")
    x[:, 4, 0, 0, 0] = float("-inf")  # every shift of a channel
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    native = nn.BatchNorm3d(6)
    nn.init.uniform_(native.weight, 0.5, 1.5)
    nn.init.normal_(native.bias)
    layer = adanorm.AdaptiveNorm3d(6, mode="batch", policy=adanorm.Policy(skip_nonfinite=False))
    layer.load_state_dict(native.state_dict())
    running_mean, running_var = torch.zeros(6), torch.ones(6)
    expected = native(x)
    results = [
        (layer(x), layer.running_mean, layer.running_var),
        (adaptive_norm(x, "batch", native.weight, native.bias, running_mean, running_var, training=True),
         running_mean, running_var),
    ]
    for results_of_one in results:
        for got, want in zip(results_of_one, (expected, native.running_mean, native.running_var)):
            for got_mask, want_mask in zip(_nonfinite(got), _nonfinite(want)):
                assert torch.equal(got_mask, want_mask)
            finite = want.isfinite()
            torch.testing.assert_close(got[finite], want[finite])
    assert not native.running_mean[:5].isfinite().any() and native.running_mean[5].isfinite()
