"""Property-based fuzzing of the layers over shapes, layouts, dtypes, modes, presets and backends.

Properties: auto mode never raises; finite input gives finite output; the output has the input's
shape, dtype and memory format; forced modes equal the native module wherever it runs (checked
against a float64 evaluation of the native module, since native float32 has bugs of its own), and
raise a clear error where it does not; running statistics stay finite.

CI runs a fixed set of examples (derandomized, so a red run reproduces);
``ADANORM_FUZZ_EXAMPLES=20000 HYPOTHESIS_PROFILE=explore python -m pytest tests/module/test_fuzz.py``
explores new ones.
"""
import contextlib
import math
import os
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_forced_modes import CHANNELS_LAST, native_module

import adanorm
from adanorm import PRESETS, FallbackWarning
from adanorm.functional import dispatch

EXAMPLES = int(os.environ.get("ADANORM_FUZZ_EXAMPLES", "600"))
settings.register_profile("ci", max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", max_examples=EXAMPLES, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ADAPTIVE_BY_RANK = {3: adanorm.AdaptiveNorm1d, 4: adanorm.AdaptiveNorm2d, 5: adanorm.AdaptiveNorm3d}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
MODES = ("auto",) + adanorm.MODES


@st.composite
def cases(draw, modes=MODES):
    spatial = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
    shape = (draw(st.integers(0, 8)), draw(st.integers(1, 64))) + spatial
    dtype = draw(st.sampled_from(DTYPES))
    low_precision = dtype in (torch.bfloat16, torch.float16)
    return {
        "shape": shape,
        "dtype": dtype,
        # Parameters in another dtype where native norms accept it: low-precision input, float32 parameters (AMP).
        "param_dtype": draw(st.sampled_from([dtype, torch.float32])) if low_precision else dtype,
        "channels_last": len(shape) in CHANNELS_LAST and draw(st.booleans()),
        "requires_grad": draw(st.booleans()),
        "training": draw(st.booleans()),
        "mode": draw(st.sampled_from(modes)),
        "preset": draw(st.sampled_from([None, *PRESETS])),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "fused": draw(st.booleans()),
        "steps": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 2**16)),
    }


@contextlib.contextmanager
def backend(fused):
    """The compiled kernels on every input they accept (thresholds at zero), or the native kernels only."""
    if fused:
        assert dispatch.cpu_kernels() is not None
        thresholds = {name: 0 for name in dir(dispatch) if name.startswith("MIN_NUMEL_")}
        with mock.patch.multiple(dispatch, **thresholds):
            yield
    else:
        with mock.patch.object(dispatch, "cpu_kernels", lambda: None):
            yield


def make_input(case):
    generator = torch.Generator().manual_seed(case["seed"])
    x = (torch.randn(case["shape"], generator=generator, dtype=torch.float64) * 2 + 1).to(case["dtype"])
    if case["channels_last"]:
        x = x.contiguous(memory_format=CHANNELS_LAST[x.dim()])
    return x.requires_grad_(case["requires_grad"])


def make_layer(case, cls=None):
    channels = case["shape"][1]
    layer = (cls or ADAPTIVE_BY_RANK[len(case["shape"])])(
        channels, affine=case["affine"], track_running_stats=case["track"], preset=case["preset"],
        mode=case["mode"], dtype=case["param_dtype"])
    if case["affine"]:
        generator = torch.Generator().manual_seed(case["seed"] + 1)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            layer.bias.copy_(torch.rand(channels, generator=generator) - 0.5)
    return layer.train(case["training"])


def assert_same_layout(x, y):
    assert y.shape == x.shape and y.dtype == x.dtype
    for memory_format in (torch.contiguous_format, CHANNELS_LAST.get(x.dim())):
        if memory_format is not None and x.is_contiguous(memory_format=memory_format):
            assert y.is_contiguous(memory_format=memory_format), f"output lost {memory_format}"


def run(layer, x, steps):
    for _ in range(steps):
        y = layer(x)
        if x.requires_grad or any(p.requires_grad for p in layer.parameters()):
            y.float().square().mean().backward() if y.numel() else None
    return y


@pytest.mark.slow
@given(cases(modes=("auto",)))
def test_auto_never_raises_and_keeps_shape_dtype_layout_and_finiteness(case):
    x = make_input(case)
    layer = make_layer(case)
    with backend(case["fused"]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        y = run(layer, x, case["steps"])
        layer.eval()
        y_eval = layer(x.detach())
    for output in (y, y_eval):
        assert_same_layout(x, output)
        assert torch.isfinite(output).all()
    if x.requires_grad and x.numel():
        assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    if case["track"]:
        assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()


LOW_PRECISION = (torch.bfloat16, torch.float16)


def native_run(case, layer, x, upstream, dtype):
    """The native module for the forced mode, with the layer's parameters and buffers, in ``dtype``
    (float64: the truth; or the case's own dtypes): (module, output, input gradient), or None if it raises."""
    native = native_module(case["mode"], x.shape[1], layer.eps, layer.momentum, case["affine"], case["track"],
                           layer.num_groups, x.dim()).train(case["training"])
    native = native.to(torch.float64 if dtype == torch.float64 else case["param_dtype"])
    state = {k: (v.to(torch.float64 if dtype == torch.float64 else case["param_dtype"]) if v.is_floating_point() else v)
             for k, v in layer.state_dict().items() if k in native.state_dict()}
    native.load_state_dict(state, strict=True)
    reference_input = x.detach().to(dtype).requires_grad_(x.requires_grad)
    try:
        output = native(reference_input)
        if x.requires_grad and x.numel():
            output.backward(upstream.to(output.dtype))
    except Exception:
        return None
    return native, output.detach().double(), None if reference_input.grad is None else reference_input.grad.double()


def values_per_statistic(case, layer):
    """How many values each mean/variance of the forced mode averages (None: running statistics)."""
    n, c, spatial = case["shape"][0], case["shape"][1], math.prod(case["shape"][2:])
    mode = case["mode"]
    if mode == "batch":
        return None if not case["training"] and case["track"] else n * spatial
    return {"instance": spatial, "group": c // layer.num_groups * spatial, "layer": c * spatial}.get(mode)


def assert_accurate(ours, truth, native, dtype, tolerance):
    """float32/float64: within ``tolerance`` of the float64 truth. bfloat16/float16 carry ~3 digits, so a
    statistic over two nearly equal values is ill-conditioned in any implementation: there, at most
    twice native's own error in the same dtype, plus ``tolerance``."""
    if dtype not in LOW_PRECISION or truth.numel() == 0:
        torch.testing.assert_close(ours, truth, rtol=tolerance, atol=tolerance)
        return
    error, native_error = (ours - truth).abs().max().item(), (native - truth).abs().max().item()
    assert error <= 2 * native_error + tolerance * (1 + truth.abs().max().item()), (error, native_error)


@pytest.mark.slow
@given(cases(modes=adanorm.MODES))
def test_forced_modes_equal_the_native_module_where_it_runs(case):
    if case["preset"] == "auto":
        case["preset"] = None  # its batch-size-dependent momentum has no native counterpart
    x = make_input(case)
    layer = make_layer(case)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(case["seed"] + 2), dtype=torch.float64)
    truth = native_run(case, layer, x, upstream, torch.float64)
    values = values_per_statistic(case, layer)
    if truth is None and x.numel() == 0 and values != 1:
        with backend(case["fused"]):  # native fails on this empty shape; ours passes the empty batch through
            y = layer(x)
        assert_same_layout(x, y)
        return
    if truth is None or values == 1:  # where native raises, or would silently output β: a clear error
        with backend(case["fused"]), pytest.raises(ValueError, match="cannot normalize input of shape"):
            layer(x)
        return
    native, expected, expected_grad = truth
    with backend(case["fused"]):
        y = layer(x)
        if x.requires_grad and x.numel():
            y.backward(upstream.to(y.dtype))
    assert_same_layout(x, y)
    same_dtype = native_run(case, make_layer(case), x, upstream, case["dtype"]) if case["dtype"] in LOW_PRECISION else truth
    tolerance = TOLERANCE[case["dtype"]] * max(1.0, math.sqrt(x.shape[1]) if case["mode"] == "layer" else 1.0)
    assert_accurate(y.detach().double(), expected, same_dtype[1], case["dtype"], tolerance)
    if x.requires_grad and x.numel():
        assert_accurate(x.grad.double(), expected_grad, same_dtype[2], case["dtype"], tolerance * 20)
    if case["mode"] == "batch" and case["track"] and case["training"]:
        buffer_tolerance = TOLERANCE[case["param_dtype"]] * 10
        torch.testing.assert_close(layer.running_mean.double(), native.running_mean.double(), rtol=buffer_tolerance, atol=buffer_tolerance)
        torch.testing.assert_close(layer.running_var.double(), native.running_var.double(), rtol=buffer_tolerance, atol=buffer_tolerance)
