"""The compiled CPU kernels as torch operators (issue #10): ``torch.ops.adanorm.fused_norm`` and
``torch.ops.adanorm.native_group_norm``, registered in C++ (adanorm/csrc/norm_cpu_ops.cpp) with fake
kernels in adanorm/functional/cpu_ops.py.

``torch.library.opcheck`` checks each operator's schema (declared mutations and aliasing), fake
kernel (against the real outputs), autograd registration and AOTAutograd tracing (outputs and
gradients equal eager); then the tools themselves: torch.jit.trace records the operator,
torch.compile(fullgraph=True) and torch.export trace it without graph breaks, equal to eager.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

from adanorm.functional import cpu_fused, dispatch

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")

LAYOUTS = ["contiguous", "channels_last"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
OPCHECK_TESTS = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
                 "test_aot_dispatch_dynamic"]
EAGER_OPCHECK_TESTS = ["test_schema", "test_autograd_registration", "test_faketensor"]
"""For the operators only eager code calls (``norm_activation``: captured code runs the native pair instead), whose
autograd kernel reads γ and β to choose what to save."""


@pytest.fixture(scope="module", autouse=True)
def kernels():
    kernels = dispatch.cpu_kernels()
    assert kernels is not None, "the compiled CPU kernels did not build (see the warning)"
    return kernels


def _format(layout: str, dim: int) -> torch.memory_format:
    if layout == "contiguous" or dim < 4:
        return torch.contiguous_format
    return torch.channels_last_3d if dim == 5 else torch.channels_last


def _input(shape, dtype=torch.float32, layout="channels_last", seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 3
    return x.to(dtype).contiguous(memory_format=_format(layout, len(shape)))


def _parameters(channels, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    return weight.to(dtype), torch.randn(channels, generator=generator, dtype=torch.float64).to(dtype)


def _leaves(*tensors, requires_grad=True):
    return [None if t is None else t.detach().clone(memory_format=torch.preserve_format).requires_grad_(requires_grad)
            for t in tensors]


# (groups, running statistics, affine: "both" | "weight" | "none", what requires grad: "all" | "parameters" | "none").
# Groups 0 is batch mode, which alone updates running statistics. Each case meets both layouts, in two dtypes.
FUSED_CASES = [
    (0, True, "both", "all"), (4, False, "both", "parameters"),
    (1, False, "none", "all"), (0, False, "weight", "none"),
    (2, False, "both", "none"), (0, True, "both", "parameters"),
]
FUSED_PARAMETERS = [
    (layout, dtype, FUSED_CASES[(2 * i + k + (2 if layout == "channels_last" else 0)) % len(FUSED_CASES)])
    for layout in LAYOUTS for i, dtype in enumerate(DTYPES) for k in range(2)
]


@pytest.mark.slow
@pytest.mark.parametrize("layout,dtype,case", FUSED_PARAMETERS, ids=str)
def test_opcheck_fused_norm(layout, dtype, case):
    groups, running, affine, grad = case
    shape = (2, 4, 3, 4, 5) if dtype != torch.float64 else (3, 4, 5, 6)  # 5-D and 4-D
    x = _input(shape, dtype, layout)
    weight, bias = _parameters(shape[1], dtype)
    weight, bias = (weight, bias) if affine == "both" else (weight, None) if affine == "weight" else (None, None)
    x, = _leaves(x, requires_grad=grad == "all")
    weight, bias = _leaves(weight, bias, requires_grad=grad != "none")
    stats = (torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)) if running else (None, None)
    args = (x, weight, bias, groups, 1e-5, *stats, 0.1)
    torch.library.opcheck(torch.ops.adanorm.fused_norm.default, args, test_utils=OPCHECK_TESTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout,dtype", list(itertools.product(LAYOUTS, DTYPES)), ids=str)
@pytest.mark.parametrize("grad", ["parameters", "all", "none"])
def test_opcheck_native_group_norm(layout, dtype, grad):
    """"parameters" is the case the operator exists for: γ and β want gradients, the input does not."""
    x = _input((2, 8, 3, 4, 5), dtype, layout)
    x, = _leaves(x, requires_grad=grad == "all")
    weight, bias = _leaves(*_parameters(8, dtype), requires_grad=grad != "none")
    torch.library.opcheck(torch.ops.adanorm.native_group_norm.default, (x, weight, bias, 4, 1e-5),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_internal_operators(layout):
    """What the autograd kernel of fused_norm runs: the forward (which mutates running statistics)
    and the backward, with and without the input gradient."""
    x = _input((2, 4, 3, 4, 5), layout=layout)
    weight, bias = _parameters(4)
    stats = (torch.zeros(4), torch.ones(4))
    torch.library.opcheck(torch.ops.adanorm._fused_norm_forward.default, (x, weight, bias, 0, 1e-5, *stats, 0.1),
                          test_utils=OPCHECK_TESTS)
    _, mean, rstd = torch.ops.adanorm._fused_norm_forward(x, weight, bias, 2, 1e-5, None, None, 0.1)
    dy = torch.randn_like(x)
    for need_input in (True, False):
        torch.library.opcheck(torch.ops.adanorm._fused_norm_backward.default,
                              (dy, x, weight, mean, rstd, 2, need_input), test_utils=OPCHECK_TESTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation,parameter,per_channel", [(0, 1.0, False), (1, 0.01, False), (1, 0.25, True),
                                                              (2, 1.0, False)], ids=["identity", "leaky", "prelu", "elu"])
def test_opcheck_norm_activation_operators(layout, activation, parameter, per_channel):
    """The fused norm + activation's operators (functional/norm_act.py calls them): ``norm_activation`` and its
    in-place form with their C++ autograd, with an affine map that backward inverts and one it cannot (γ = 0 in
    a channel: the input is kept); and the internal forward writing into a given output or into its own input
    (declared mutation) and backward from the output or the kept input."""
    x = _input((2, 4, 3, 4, 5), layout=layout)
    weight, bias = _parameters(4)
    slopes = torch.full((4,), parameter) if per_channel else None
    autograd_groups = 2 if layout == "contiguous" else 0  # the autograd operators: one statistics kind per layout,
    for groups in (0, 2):  # their kernels (the internal operators below) every one
        gammas = (weight, weight.clone().index_fill_(0, torch.tensor([1]), 0.0)) if groups == autograd_groups else ()
        for gamma in gammas:
            arguments = (x.clone().requires_grad_(), gamma.clone().requires_grad_(), bias.clone().requires_grad_(),
                         None if slopes is None else slopes.clone().requires_grad_(), groups, 1e-5, activation,
                         parameter, 8.0)
            torch.library.opcheck(torch.ops.adanorm.norm_activation.default, arguments, test_utils=EAGER_OPCHECK_TESTS)
            own = x.clone(memory_format=torch.preserve_format)
            torch.library.opcheck(torch.ops.adanorm.norm_activation_.default, (own,) + arguments[1:],
                                  test_utils=EAGER_OPCHECK_TESTS)
        out = torch.empty_like(x)
        torch.library.opcheck(torch.ops.adanorm._norm_activation_forward.default,
                              (x, weight, bias, groups, 1e-5, activation, parameter, slopes, out), test_utils=OPCHECK_TESTS)
        own = x.clone(memory_format=torch.preserve_format)
        torch.library.opcheck(torch.ops.adanorm._norm_activation_forward.default,
                              (own, weight, bias, groups, 1e-5, activation, parameter, slopes, own), test_utils=OPCHECK_TESTS)
    mean, rstd, _, _ = torch.ops.adanorm._norm_activation_forward(x, weight, bias, 2, 1e-5, activation, parameter, slopes,
                                                                  out)
    dy = torch.randn_like(x)
    for need_input in (True, False):
        for kept_input, kept_mean in ((None, None), (x, mean)):
            torch.library.opcheck(torch.ops.adanorm._norm_activation_backward.default,
                                  (dy, out, weight, bias, rstd, 2, activation, parameter, slopes, kept_input, kept_mean,
                                   need_input, per_channel), test_utils=OPCHECK_TESTS)


BLEND_CASES = [  # (dtype, factor: a float or a 0-dim tensor, batch statistics hold NaN/Inf)
    (torch.float32, 0.1, False), (torch.float64, 0.3, False), (torch.bfloat16, 0.1, False),
    (torch.float16, 0.7, False), (torch.float32, "tensor", False), (torch.float32, 0.1, "nan"),
    (torch.float64, "tensor", "inf"), (torch.bfloat16, 0.1, "inf"),
]


@pytest.mark.parametrize("dtype,factor,nonfinite", BLEND_CASES, ids=str)
@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no-guard"])
def test_blend_operator_equals_the_tensor_operations(dtype, factor, nonfinite, guard):
    """``adanorm::blend_running_stats`` (what eager CPU layers run) against ``running_stats.blend``
    (what compiled, scripted and CUDA layers run): same running statistics and counter, bit for bit
    in float64, to one rounding in the low-precision dtypes; a non-finite step is skipped and counted
    only with the guard, else it propagates as in native BatchNorm."""
    from adanorm.functional.running_stats import blend

    generator = torch.Generator().manual_seed(3)
    channels = 37
    running = [torch.randn(channels, generator=generator, dtype=torch.float64).to(dtype),
               (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5).to(dtype)]
    batch = [torch.randn(channels, generator=generator, dtype=torch.float64).to(dtype),
             (torch.rand(channels, generator=generator, dtype=torch.float64) * 3).to(dtype)]
    if nonfinite:
        batch[1][5] = float("nan") if nonfinite == "nan" else float("inf")
    factor = torch.tensor(0.25, dtype=torch.float64) if factor == "tensor" else factor
    expected = [t.clone() for t in running]
    expected_skips = torch.zeros((), dtype=torch.long) if guard else None
    blend(*expected, *batch, factor, expected_skips)
    actual = [t.clone() for t in running]
    actual_skips = torch.zeros((), dtype=torch.long) if guard else None
    cpu_fused.blend_running_stats(*actual, *batch, factor, actual_skips)
    tolerance = {} if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else \
        dict(rtol=1e-6, atol=1e-7)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, equal_nan=True, **(tolerance or dict(rtol=0, atol=0)))
    if guard:
        assert int(actual_skips) == int(expected_skips) == (1 if nonfinite else 0)
        if nonfinite:
            assert all(torch.equal(got, start) for got, start in zip(actual, running))
    elif nonfinite:
        assert not torch.isfinite(actual[1]).all()


@pytest.mark.slow
def test_opcheck_blend_operator():
    running = (torch.zeros(4), torch.ones(4))
    batch = (torch.randn(4), torch.rand(4))
    for factor, tensor_factor, skips in ((0.1, None, torch.zeros((), dtype=torch.long)),
                                         (0.0, torch.tensor(0.5), None)):
        torch.library.opcheck(torch.ops.adanorm.blend_running_stats.default,
                              (*[t.clone() for t in running], *batch, factor, tensor_factor, skips),
                              test_utils=["test_schema", "test_faketensor"])


def _strided_channels_last_view():
    return _input((2, 6, 4, 4, 8))[..., ::2]  # native kernels lay it out channels-last


def _strided_contiguous_view():
    return _input((2, 6, 4, 4, 8), layout="contiguous")[..., ::2]


@pytest.mark.parametrize("make_input", [
    lambda: _input((2, 6, 3, 4, 5)),
    lambda: _input((2, 6, 3, 4, 5), layout="contiguous"),
    lambda: _input((2, 6, 5, 7)),
    lambda: _input((2, 6, 1, 1)),  # both contiguous and channels-last: the kernels take it as contiguous
    lambda: _input((4, 6, 7), layout="contiguous"),
    _strided_channels_last_view,
    _strided_contiguous_view,
    lambda: _input((2, 6, 3, 4, 5), layout="contiguous").transpose(2, 4),
], ids=["cl3d", "contiguous", "cl2d", "cl2d-1x1", "3d", "strided-cl", "strided-contiguous", "transposed"])
def test_fake_kernels_give_the_real_layout(make_input):
    x = make_input()
    weight, bias = _parameters(6)
    real = [torch.ops.adanorm.fused_norm(x, weight, bias, 3, 1e-5, None, None, 0.1),
            torch.ops.adanorm.native_group_norm(x, weight, bias, 3, 1e-5)]
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (x, weight, bias)]
        fake = [torch.ops.adanorm.fused_norm(*fakes, 3, 1e-5, None, None, 0.1),
                torch.ops.adanorm.native_group_norm(*fakes, 3, 1e-5)]
    for got, want in zip(fake, real):
        assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype)
    assert real[1].stride() == F.group_norm(x, 3, weight, bias).stride()


def test_jit_trace_records_the_operator():
    def normalize(x, weight, bias):
        return torch.ops.adanorm.fused_norm(x, weight, bias, 4, 1e-5, None, None, 0.1) * 2

    weight, bias = _parameters(8)
    traced = torch.jit.trace(normalize, (_input((2, 8, 4, 4, 4)), weight, bias))
    kinds = [node.kind() for node in traced.graph.nodes()]
    assert "adanorm::fused_norm" in kinds and "prim::PythonOp" not in kinds, traced.graph
    other = _input((2, 8, 4, 4, 4), seed=5) * 3 + 1
    output = traced(other, weight, bias)
    assert torch.equal(output, normalize(other, weight, bias))
    assert output.is_contiguous(memory_format=torch.channels_last_3d)
    # The recorded operator keeps its autograd kernel and its running-statistics updates.
    dy = torch.randn_like(other)
    traced_leaves, eager_leaves = _leaves(other, weight, bias), _leaves(other, weight, bias)
    traced(*traced_leaves).backward(dy)
    normalize(*eager_leaves).backward(dy)
    for got, want in zip(traced_leaves, eager_leaves):
        assert torch.equal(got.grad, want.grad)

    def batch(x, running_mean, running_var):
        return torch.ops.adanorm.fused_norm(x, None, None, 0, 1e-5, running_mean, running_var, 0.1)

    traced_stats, eager_stats = (torch.zeros(8), torch.ones(8)), (torch.zeros(8), torch.ones(8))
    traced_batch = torch.jit.trace(batch, (_input((2, 8, 4, 4, 4)), torch.zeros(8), torch.ones(8)))
    assert torch.equal(traced_batch(other, *traced_stats), batch(other, *eager_stats))
    for got, want in zip(traced_stats, eager_stats):
        assert torch.equal(got, want) and not torch.equal(got, torch.zeros(8))


def test_jit_trace_of_native_group_norm_records_the_native_operator():
    """A traced graph (and ONNX export, which traces) carries aten::group_norm, which every runtime knows."""
    def normalize(x, weight, bias):
        return torch.ops.adanorm.native_group_norm(x, weight, bias, 4, 1e-5)

    weight, bias = _leaves(*_parameters(8))
    traced = torch.jit.trace(normalize, (_input((2, 8, 4, 4, 4)), weight, bias))
    kinds = [node.kind() for node in traced.graph.nodes()]
    assert "aten::group_norm" in kinds and "adanorm::native_group_norm" not in kinds, traced.graph


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [0, 4, 1])
def test_compile_fullgraph_equals_eager(groups, layout):
    """Outputs, input/weight/bias gradients and running statistics, over two steps with one graph."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(x, weight, bias, running_mean, running_var):
        return torch.ops.adanorm.fused_norm(x, weight, bias, groups, 1e-5, running_mean, running_var, 0.1).sin()

    compiled = torch.compile(step, backend=counter, fullgraph=True)  # a graph break would raise
    weight, bias = _parameters(8)
    stats = {"eager": [torch.zeros(8), torch.ones(8)], "compiled": [torch.zeros(8), torch.ones(8)]}
    for seed in (0, 1):
        x = _input((2, 8, 3, 4, 5), layout=layout, seed=seed)
        dy = torch.randn_like(x)
        results = {}
        for name, function in (("eager", step), ("compiled", compiled)):
            leaves = _leaves(x, weight, bias)
            running = stats[name] if groups == 0 else (None, None)
            output = function(*leaves, *running)
            output.backward(dy)
            results[name] = [output] + [t.grad for t in leaves]
        for got, want in zip(results["compiled"], results["eager"]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert results["compiled"][0].stride() == results["eager"][0].stride()
    for got, want in zip(stats["compiled"], stats["eager"]):
        assert torch.equal(got, want)
    if groups == 0:
        assert not torch.equal(stats["compiled"][0], torch.zeros(8))
    assert counter.frame_count == 1


def test_compile_native_group_norm_with_a_frozen_channels_last_input():
    """The crash-free backward under AOTAutograd: γ and β want gradients, the input does not."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(x, weight, bias):
        return torch.ops.adanorm.native_group_norm(x, weight, bias, 4, 1e-5)

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    x = _input((2, 8, 3, 4, 5))
    dy = torch.randn_like(x)
    results = []
    for function in (step, compiled):
        weight, bias = _leaves(*_parameters(8))
        output = function(x, weight, bias)
        results.append([output, *torch.autograd.grad(output, [weight, bias], dy)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


class _BatchNormModule(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight, self.bias = (nn.Parameter(t) for t in _parameters(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return torch.ops.adanorm.fused_norm(x, self.weight, self.bias, 0, 1e-5, self.running_mean, self.running_var,
                                            0.1)


def test_torch_export_keeps_the_operator_and_its_buffer_updates():
    x = _input((2, 8, 3, 4, 5))
    exported = torch.export.export(_BatchNormModule(8), (x,)).run_decompositions()
    assert "adanorm.fused_norm" in exported.graph_module.code
    module, eager = exported.module(), _BatchNormModule(8)
    other = _input((2, 8, 3, 4, 5), seed=3)
    output = module(other)
    assert torch.equal(output, eager(other)) and output.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(module.running_mean, eager.running_mean) and torch.equal(module.running_var, eager.running_var)


def test_operators_are_registered_once_per_process(monkeypatch, tmp_path, kernels):
    """Once registered, cpu_kernels() never loads a library again: one rebuilt since (its source
    changed) or from another TORCH_EXTENSIONS_DIR would register the operators a second time, which
    aborts the process."""
    from torch.utils import cpp_extension

    assert kernels.fused_norm is torch.ops.adanorm.fused_norm.default
    assert kernels.native_group_norm is torch.ops.adanorm.native_group_norm.default

    def no_load(**kwargs):
        raise AssertionError("cpu_kernels() loaded a library again")

    monkeypatch.setattr(cpp_extension, "load", no_load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    try:
        dispatch.cpu_kernels.cache_clear()
        again = dispatch.cpu_kernels()
        assert again.__file__ == kernels.__file__ and again.fused_norm is kernels.fused_norm
        assert not any(tmp_path.iterdir())  # nothing built there
    finally:
        monkeypatch.undo()
        dispatch.cpu_kernels.cache_clear()
    x = _input((2, 4, 3, 4, 5))
    torch.testing.assert_close(cpu_fused.fused_norm(x, 2, None, None, 1e-5), F.group_norm(x, 2))
