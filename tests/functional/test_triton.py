"""Triton backend against native PyTorch, on the CPU through Triton's interpreter: no GPU needed.

Under ``TRITON_INTERPRET=1`` the ``@triton.jit`` kernels are interpreted: they take CPU tensors
(the interpreter runs each program on the host), and ``triton_norm.triton_available`` admits CPU
tensors for exactly that case. The whole module skips without triton (the README's test command
installs none; CI does).

Triton decides between interpreted and compiled kernels when it decorates them, its own standard
library included, so ``TRITON_INTERPRET=1`` must be set before triton's first import in the
process. This module sets it around its own imports (and around each test), then restores it so
no other test module sees it. When an earlier test module already imported triton, the
interpreted tests run in a fresh Python process instead.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from adanorm.functional import dispatch

pytestmark = pytest.mark.slow  # recipe runs, subprocesses or builds: the full suite's part

_NO_TRITON = "triton is not installed (optional: pip install triton); the Triton backend tests need it"
_previous_interpret = os.environ.get("TRITON_INTERPRET")
_INTERPRETER_USABLE = "triton" not in sys.modules or _previous_interpret == "1"
if _INTERPRETER_USABLE:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip("triton", reason=_NO_TRITON)
        from adanorm.functional import triton_norm
    finally:
        if _previous_interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous_interpret
else:
    triton = pytest.importorskip("triton", reason=_NO_TRITON)
    triton_norm = None  # importing it here would mix interpreted kernels with compiled triton

TRITON_KERNELS_PATH = importlib.util.find_spec("adanorm.functional.triton_kernels").origin
interpreted = pytest.mark.skipif(
    not _INTERPRETER_USABLE, reason="triton was imported without TRITON_INTERPRET: a fresh process runs this"
)
SHAPE = (2, 6, 3, 5, 7)  # 105 spatial values, 6 channels: no power of two anywhere
LAYOUTS = ["contiguous", "channels_last"]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if _INTERPRETER_USABLE:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def _reference(mode: str, x, weight, bias, eps=1e-5):
    """The native module each mode stands in for."""
    if mode == "instance":
        return F.instance_norm(x, weight=weight, bias=bias, eps=eps)
    if mode == "group":
        return F.group_norm(x, 3, weight, bias, eps)
    return F.group_norm(x, 1, weight, bias, eps)  # nn.GroupNorm(1, C): layer mode


def _groups(mode: str, channels: int) -> int:
    return {"instance": channels, "group": 3, "layer": 1}[mode]


def _compare(mode, x, weight, bias, atol, rtol, grad_atol=None):
    """Outputs and input/weight/bias gradients of the Triton path against a float64 native reference."""
    grad_atol = atol if grad_atol is None else grad_atol
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    output = triton_norm.triton_grouped_norm(leaves[0], _groups(mode, x.shape[1]), leaves[1], leaves[2], 1e-5)
    grad_output = torch.randn(output.shape, dtype=torch.float64)
    grads = torch.autograd.grad(output, leaves, grad_output.to(output.dtype))

    reference_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = _reference(mode, *reference_leaves)
    expected_grads = torch.autograd.grad(expected, reference_leaves, grad_output)

    assert output.dtype == x.dtype and output.stride() == x.stride()
    torch.testing.assert_close(output.double(), expected, atol=atol, rtol=rtol)
    for grad, expected_grad, name in zip(grads, expected_grads, ("input", "weight", "bias")):
        assert grad.dtype == x.dtype, name
        torch.testing.assert_close(grad.double(), expected_grad, atol=grad_atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["instance", "group", "layer"])
def test_modes_match_native(mode, layout, dtype):
    x = _in_layout(torch.randn(SHAPE, dtype=dtype) * 2 + 3, layout)
    weight, bias = torch.randn(SHAPE[1], dtype=dtype), torch.randn(SHAPE[1], dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    _compare(mode, x, weight, bias, atol=tolerance, rtol=tolerance)


@interpreted
@pytest.mark.parametrize("mode, layout", [("instance", "channels_last"), ("group", "contiguous"), ("layer", "channels_last")])
def test_small_tiles_exercise_every_merge_loop(mode, layout, monkeypatch):
    """Tiles of 8 values force spatial chunks, multi-block Welford merges and (layer mode) finalize row loops."""
    monkeypatch.setattr(triton_norm, "_MAX_TILE", 8)
    monkeypatch.setattr(triton_norm, "_MAX_CHANNEL_BLOCK", 4)
    monkeypatch.setattr(triton_norm, "_INTERPRETER_PROGRAMS", 24)
    x = _in_layout(torch.randn(2, 9, 3, 5, 2, dtype=torch.float64) + 5, layout)
    geometry = triton_norm._geometry(triton_norm._flat(x), _groups(mode, 9))
    assert geometry.num_chunks > 1 and geometry.chunk > geometry.block_s
    weight, bias = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    _compare(mode, x, weight, bias, atol=1e-12, rtol=1e-12)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_half_precision_accumulates_in_float32(dtype, layout):
    """An offset of 100 loses every digit of the variance in a half-precision E[x²]−E[x]²."""
    x = _in_layout((torch.randn(SHAPE) + 100).to(dtype), layout)
    weight, bias = torch.rand(SHAPE[1]).to(dtype) + 0.5, torch.randn(SHAPE[1]).to(dtype)
    # One rounding of outputs of magnitude ~4 in the input dtype; gradients sum 105+ rounded terms.
    atol = 8e-3 if dtype == torch.float16 else 6e-2
    _compare("instance", x, weight, bias, atol=atol, rtol=1e-2, grad_atol=atol * 4)


@interpreted
def test_large_mean_keeps_float32_precision():
    x = _in_layout(torch.randn(SHAPE, dtype=torch.float64) + 1e4, "channels_last")
    weight, bias = torch.ones(SHAPE[1], dtype=torch.float64), torch.zeros(SHAPE[1], dtype=torch.float64)
    output = triton_norm.triton_grouped_norm(x.float(), SHAPE[1], weight.float(), bias.float(), 1e-5)
    # Float32 resolves 1e4 to 5e-4, in the mean and in the folded x·scale + shift; a naive
    # E[x²]−E[x]² in float32 is off by O(1) here, as native CPU channels-last group norm is.
    torch.testing.assert_close(output.double(), _reference("instance", x.float().double(), weight, bias), atol=2e-3, rtol=0)


@interpreted
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_optional_affine(affine):
    x = torch.randn(2, 4, 3, 5, 2)
    weight = torch.randn(4) if affine == "weight" else None
    bias = torch.randn(4) if affine == "bias" else None
    leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    output = triton_norm.triton_grouped_norm(x, 2, weight, bias, 1e-5)
    # Native backward fails on a bias without weight, so the reference spells out the identity weight.
    expected = F.group_norm(x, 2, torch.ones(4) if weight is None else weight, bias, 1e-5)
    grad_output = torch.randn_like(expected)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(torch.autograd.grad(output, leaves, grad_output),
                                   torch.autograd.grad(expected, leaves, grad_output)):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize(
    "make_input",
    [
        lambda: torch.randn(2, 3, 5, 6).contiguous(memory_format=torch.channels_last),  # 2D, channels-last
        lambda: torch.randn(3, 4, 11),  # 1D
        lambda: torch.randn(2, 6, 4, 10)[..., ::2],  # strided: computed from a contiguous copy
        lambda: torch.randn(2, 3, 1, 1, 1),  # one value per instance: zero variance
    ],
    ids=["2d-channels-last", "1d", "strided", "single-value"],
)
def test_other_shapes_and_layouts(make_input):
    x = make_input().requires_grad_()
    channels = x.shape[1]
    weight, bias = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    output = triton_norm.triton_grouped_norm(x, channels, weight, bias, 1e-5)
    expected = F.group_norm(x, channels, weight, bias, 1e-5)
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert output.stride() == x.stride()
    grad_output = torch.randn_like(expected)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(torch.autograd.grad(output, (x, weight, bias), grad_output),
                                   torch.autograd.grad(expected, (x, weight, bias), grad_output)):
        torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_mode_matches_native_with_running_stats(layout):
    x = _in_layout(torch.randn(3, 5, 4, 3, 7, dtype=torch.float64) * 2 + 4, layout).requires_grad_()
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    running = [torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5]
    expected_running = [t.clone() for t in running]
    output = triton_norm.triton_batch_norm(x, *running, weight, bias, 0.1, 1e-5)
    expected = F.batch_norm(x, *expected_running, weight, bias, True, 0.1, 1e-5)
    grad_output = torch.randn_like(expected)
    assert output.stride() == x.stride()
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(running, expected_running, atol=1e-12, rtol=1e-12)
    for grad, expected_grad in zip(torch.autograd.grad(output, (x, weight, bias), grad_output),
                                   torch.autograd.grad(expected, (x, weight, bias), grad_output)):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-12)


_OPCHECK_CASES = [
    # (op, layout, dtype, weight and bias, running statistics / num_groups of the backward, input_grad)
    pytest.param("grouped", "channels_last", torch.float32, True, 2, None, id="grouped-cl-f32-affine-G2"),
    pytest.param("grouped", "contiguous", torch.bfloat16, False, 4, None, id="grouped-contig-bf16-instance"),
    pytest.param("batch", "contiguous", torch.float32, True, True, None, id="batch-contig-f32-affine-running"),
    pytest.param("batch", "channels_last", torch.bfloat16, False, False, None, id="batch-cl-bf16"),
    pytest.param("backward", "channels_last", torch.float32, True, 2, True, id="backward-cl-f32-weight-G2"),
    pytest.param("backward", "contiguous", torch.bfloat16, False, None, False, id="backward-contig-bf16-batch-no-dx"),
]


@interpreted
@pytest.mark.parametrize("op, layout, dtype, affine, extra, input_grad", _OPCHECK_CASES)
def test_opcheck(op, layout, dtype, affine, extra, input_grad):
    """torch.library.opcheck, every check of which runs under Triton's interpreter: schema (no
    undeclared mutation or aliasing), autograd registration, the fake implementation against the
    real one (shapes, dtypes and strides: channels-last kept) and, for the float32 forward ops with
    inputs that require grad, AOTAutograd tracing and running of forward and backward with dynamic
    shapes, which also traces the backward op through its fake implementation and runs it. The
    other cases skip that last check only to keep the test cheap: it would trace the same ops again."""
    x = _in_layout(torch.randn(2, 4, 3, 5, dtype=dtype) + 2, layout)
    weight, bias = (torch.randn(4, dtype=dtype) + 1, torch.randn(4, dtype=dtype)) if affine else (None, None)
    full = op != "backward" and dtype == torch.float32
    if full:
        x, weight, bias = (t if t is None else t.requires_grad_() for t in (x, weight, bias))
    if op == "grouped":
        args = (x, extra, weight, bias, 1e-5)
    elif op == "batch":
        running = (torch.randn(4), torch.rand(4) + 0.5) if extra else (None, None)
        args = (x, *running, weight, bias, 0.1, 1e-5)
    else:  # statistics from the forward op
        if extra is None:
            _, mean, rstd, _, _ = torch.ops.adanorm.triton_batch_norm(x, None, None, weight, bias, 0.1, 1e-5)
        else:
            _, mean, rstd = torch.ops.adanorm.triton_grouped_norm(x, extra, weight, bias, 1e-5)
        args = (torch.randn_like(x), x, weight, mean, rstd, extra, input_grad)
    operator = getattr(torch.ops.adanorm, {"grouped": "triton_grouped_norm", "batch": "triton_batch_norm",
                                           "backward": "triton_norm_backward"}[op])
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    checks += ("test_aot_dispatch_dynamic",) if full else ()
    torch.library.opcheck(operator, args, test_utils=checks)


def _native_pair(x, mode, weight, bias, activation, slopes):
    if mode == "batch":
        z = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
    else:
        z = _reference(mode, x, weight, bias)
    if activation == "leaky_relu":
        return F.leaky_relu(z, 0.1)
    if activation == "elu":
        return F.elu(z, 0.7)
    if activation == "prelu":
        return F.prelu(z, slopes)
    return z


# Every mode and every activation in both layouts (pairs, not the full product: the interpreter is slow).
_FUSED_CASES = [("batch", "contiguous", "leaky_relu"), ("batch", "channels_last", "prelu"),
                ("instance", "contiguous", "elu"), ("instance", "channels_last", "identity"),
                ("group", "contiguous", "prelu"), ("group", "channels_last", "leaky_relu"),
                ("layer", "contiguous", "identity"), ("layer", "channels_last", "elu")]


@interpreted
@pytest.mark.parametrize("mode, layout, activation", _FUSED_CASES)
def test_fused_norm_activation_matches_the_native_pair(mode, layout, activation, monkeypatch):
    """The fused norm + activation on the Triton kernels (``ADANORM_TRITON=1`` sends it there), float64 against
    native norm + activation: output, input, γ, β and PReLU-slope gradients; in place into a fresh input too."""
    from adanorm.functional.norm_act import normalize_activate

    monkeypatch.setenv("ADANORM_TRITON", "1")
    assert dispatch.norm_activation_backend(torch.ones(2, 2)) == "triton"
    generator = torch.Generator().manual_seed(4)
    x0 = _in_layout(torch.randn(SHAPE, generator=generator, dtype=torch.float64) * 2 + 3, layout)
    weight0 = torch.rand(SHAPE[1], generator=generator, dtype=torch.float64) + 0.5
    bias0 = torch.randn(SHAPE[1], generator=generator, dtype=torch.float64) * 0.5
    slopes0 = torch.rand(SHAPE[1], generator=generator, dtype=torch.float64) * 0.3 + 0.05
    grad_output = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    groups = {"batch": 0, "instance": SHAPE[1], "group": 3, "layer": 1}[mode]

    def leaves():
        return [t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x0, weight0, bias0, slopes0)]

    for inplace in (False, True):
        x, weight, bias, slopes = leaves()
        fresh = x * 1.0
        output = normalize_activate(fresh, "batch" if mode == "batch" else "group", weight, bias, None, None, True, 0.1,
                                    1e-5, max(groups, 1), None, None, False, activation, 0.1, 0.7,
                                    slopes if activation == "prelu" else None, inplace)
        assert (output.data_ptr() == fresh.data_ptr()) is inplace and output.stride() == x0.stride()
        grads = torch.autograd.grad(output, [x, weight, bias] + ([slopes] if activation == "prelu" else []), grad_output)
        reference_leaves = leaves()
        expected = _native_pair(reference_leaves[0], mode, *reference_leaves[1:3], activation, reference_leaves[3])
        expected_grads = torch.autograd.grad(expected, reference_leaves[:3] + ([reference_leaves[3]] if activation == "prelu" else []),
                                             grad_output)
        torch.testing.assert_close(output, expected, atol=1e-10, rtol=1e-10)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@interpreted
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_norm_activation_small_tiles_and_float32(layout, monkeypatch):
    """Chunked partial sums and finalize row loops, in float32 against float64: within a few times the native
    float32 pair's own error."""
    from adanorm.functional.norm_act import normalize_activate

    monkeypatch.setenv("ADANORM_TRITON", "1")
    monkeypatch.setattr(triton_norm, "_MAX_TILE", 8)
    monkeypatch.setattr(triton_norm, "_MAX_CHANNEL_BLOCK", 4)
    monkeypatch.setattr(triton_norm, "_INTERPRETER_PROGRAMS", 24)
    x64 = _in_layout(torch.randn(2, 9, 3, 5, 2, dtype=torch.float64) * 3 + 5, layout)
    weight, bias = torch.rand(9, dtype=torch.float64) + 0.5, torch.randn(9, dtype=torch.float64) * 0.5
    grad_output = torch.randn(x64.shape, dtype=torch.float64)

    def fused(x, w, b):
        return normalize_activate(x * 1.0, "group", w, b, None, None, True, 0.1, 1e-5, 3, None, None, False,
                                  "leaky_relu", 0.1, 1.0, None, False)

    def native(x, w, b):
        return F.leaky_relu(F.group_norm(x * 1.0, 3, w, b, 1e-5), 0.1)

    def run(step, dtype):
        leaves = [t.to(dtype).clone(memory_format=torch.preserve_format).requires_grad_() for t in (x64, weight, bias)]
        output = step(*leaves)
        return [output.double()] + [g.double() for g in torch.autograd.grad(output, leaves, grad_output.to(dtype))]

    reference = run(native, torch.float64)
    for got, native32, want in zip(run(fused, torch.float32), run(native, torch.float32), reference):
        fused_error, native_error = (got - want).abs().max().item(), (native32 - want).abs().max().item()
        assert fused_error <= 8 * native_error + 4 * torch.finfo(torch.float32).eps * want.abs().max().item()


@interpreted
@pytest.mark.parametrize("groups", [None, 2], ids=["batch", "group"])
@pytest.mark.parametrize("activation", [0, 1, 2], ids=["identity", "slope", "elu"])
def test_opcheck_norm_activation_ops(groups, activation):
    """Schema (the forward mutates only ``out``, which may be its input), fake implementations against the real ones."""
    x = _in_layout(torch.randn(2, 4, 3, 5) + 2, "channels_last")
    weight, bias = torch.rand(4) + 0.5, torch.randn(4)
    parameter = None if activation == 0 else torch.full((4,), 0.2)
    checks = ("test_schema", "test_faketensor")
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.adanorm.triton_norm_activation,
                          (x, weight, bias, groups, 1e-5, activation, parameter, out), test_utils=checks)
    rstd, _, _ = torch.ops.adanorm.triton_norm_activation(x, weight, bias, groups, 1e-5, activation, parameter, out)
    for input_grad in (True, False):
        torch.library.opcheck(torch.ops.adanorm.triton_norm_activation_backward,
                              (torch.randn_like(x), out, weight, bias, rstd, groups, activation, parameter, input_grad),
                              test_utils=checks)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@interpreted
def test_compile_sees_one_op_per_norm(fresh_dynamo):
    """fullgraph compilation through both entry points: no graph break, the ops' fake implementations
    give dynamo channels-last outputs, AOTAutograd (aot_eager) runs the Triton ops forward and
    backward, and results, gradients and running statistics equal eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(x, weight, bias, running_mean, running_var):
        y = triton_norm.triton_grouped_norm(x, 2, weight, bias, 1e-5)
        return triton_norm.triton_batch_norm(y.relu(), running_mean, running_var, weight, bias, 0.1, 1e-5)

    x = _in_layout(torch.randn(2, 4, 3, 5) + 2, "channels_last")
    weight, bias = torch.randn(4) + 1, torch.randn(4)
    grad_output = torch.randn_like(x)
    results = []
    counter = CompileCounterWithBackend("aot_eager")
    for fn in (step, torch.compile(step, backend=counter, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        running = [torch.zeros(4), torch.ones(4)]
        output = fn(*leaves, *running)
        assert output.stride() == x.stride()
        results.append((output, *torch.autograd.grad(output, leaves, grad_output), *running))
    assert counter.frame_count == 1
    ops = [node for node in counter.graphs[0].graph.nodes if "adanorm.triton_" in str(node.target)]
    assert len(ops) == 2, counter.graphs[0].code
    for node in ops:  # dynamo's values come from the fake implementations
        assert node.meta["example_value"][0].stride() == x.stride()
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)


@interpreted
def test_gradients_of_gradients_raise():
    """The backward op has no derivative: a second differentiation says so rather than dropping terms."""
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    output = triton_norm.triton_grouped_norm(x, 2, None, None, 1e-5)
    (grad,) = torch.autograd.grad((output ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad.sum().backward()


@interpreted
def test_errors_match_native_types():
    with pytest.raises(RuntimeError, match="divisible"):
        triton_norm.triton_grouped_norm(torch.randn(2, 6, 4), 4, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="per-channel"):
        triton_norm.triton_grouped_norm(torch.randn(2, 6, 4), 3, torch.ones(5), None, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value"):
        triton_norm.triton_grouped_norm(torch.randn(1, 3, 1), 3, None, None, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value"):
        triton_norm.triton_batch_norm(torch.randn(1, 3, 1), None, None, None, None, 0.1, 1e-5)


@interpreted
def test_dispatch_never_sends_cpu_tensors_to_triton():
    x = torch.randn(2, 4, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    assert triton_norm.triton_available(x)  # interpreted kernels serve CPU tensors, for these tests
    assert not dispatch.prefer_triton(x)  # but production dispatch is CUDA-only
    assert not triton_norm.triton_available(x.to(torch.int32))
    assert not triton_norm.triton_available(x[:0])


class _ReportsCuda:
    """A CPU tensor that says it is on CUDA: the dispatch rule reads only device, dtype, shape and layout."""

    is_cuda = True

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def __getattr__(self, name):
        return getattr(self._tensor, name)


@interpreted
@pytest.mark.parametrize(
    "switch,layout,batch_statistics,expected",
    [
        ("", "channels_last", False, True),  # native instance/group norm copies channels-last: Triton
        ("", "contiguous", False, False),
        ("", "channels_last", True, False),  # native batch norm has channels-last kernels
        ("1", "contiguous", False, True),
        ("1", "channels_last", True, True),
        ("0", "channels_last", False, False),
    ],
)
def test_cuda_dispatch_rule(switch, layout, batch_statistics, expected, monkeypatch):
    monkeypatch.setenv("ADANORM_TRITON", switch)
    x = torch.randn(2, 4, 3, 3, 3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    assert dispatch.prefer_triton(_ReportsCuda(x), batch_statistics) is expected


def _load_as(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_module_imports_without_triton(monkeypatch):
    """Both modules load again with `import triton` failing, in this process (a fresh one would cost a
    torch import): the ops they register go to a scratch namespace, so the adanorm:: ops keep the
    implementations the other tests run."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    custom_op = torch.library.custom_op
    monkeypatch.setattr(torch.library, "custom_op",
                        lambda name, *args, **kwargs: custom_op(name.replace("adanorm::", "adanorm_no_triton::"),
                                                                *args, **kwargs))
    import adanorm.functional

    kernels_name, norm_name = "adanorm.functional.triton_kernels", "_triton_norm_without_triton"
    for name in (kernels_name, norm_name):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name))
    kernels = _load_as(kernels_name, TRITON_KERNELS_PATH)
    monkeypatch.setattr(adanorm.functional, "triton_kernels", kernels, raising=False)
    module = _load_as(norm_name, os.path.join(os.path.dirname(TRITON_KERNELS_PATH), "triton_norm.py"))

    assert kernels.triton is None and not hasattr(kernels, "_apply_kernel")
    x = torch.randn(2, 3, 4)
    assert not module.triton_available(x)
    with pytest.raises(RuntimeError, match="triton is not installed"):  # registered all the same, and say why
        torch.ops.adanorm_no_triton.triton_grouped_norm(x, 3, None, None, 1e-5)


@pytest.mark.skipif(_INTERPRETER_USABLE, reason="the interpreted tests run in this process")
def test_interpreted_tests_in_a_fresh_process():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


_COMPILE_SCRIPT = textwrap.dedent('''
    import importlib.util, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.interpreter import InterpretedFunction

    # triton_kernels imports nothing but triton, so it loads on its own.
    spec = importlib.util.spec_from_file_location("triton_kernels", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not isinstance(module._apply_kernel, InterpretedFunction)

    def variant(kernel, pointers, scalars, **constants):
        types = {name: "*" + dtype for names, dtype in pointers for name in names.split()}
        types.update({name: dtype for names, dtype in scalars for name in names.split()})
        types.update({name: "constexpr" for name in constants})
        return kernel, types, constants

    def kernels(data, acc):
        partial_stats_pointers = [("x_ptr dy_ptr", data), ("stat_mean_ptr parameter_ptr partial_a_ptr partial_b_ptr", acc)]
        partial_stats_scalars = [("C S chunk stat_stride_n channels_per_stat stride_c stride_s", "i32"), ("stride_n", "i64")]
        apply_pointers = [("x_ptr dy_ptr out_ptr", data), ("x_scale_ptr shift_ptr dy_scale_ptr parameter_ptr", acc)]
        apply_scalars = [("C S coefficient_stride_n stride_c stride_s", "i32"), ("stride_n", "i64")]
        finalize_grad_pointers = [("partial_dy_ptr partial_dy_xc_ptr mean_ptr rstd_ptr dy_scale_ptr x_scale_ptr shift_ptr", acc),
                                  ("grad_weight_ptr grad_bias_ptr", acc), ("weight_ptr bias_ptr", data)]
        finalize_grad_scalars = [("C rows cols partial_sample_stride partial_row_stride stat_count", "i32")]
        return [
            variant(module._partial_stats_kernel, partial_stats_pointers, partial_stats_scalars,
                    BACKWARD=True, ACTIVATION=0, BLOCK_S=64, BLOCK_C=32),
            variant(module._partial_stats_kernel, partial_stats_pointers, partial_stats_scalars,
                    BACKWARD=False, ACTIVATION=0, BLOCK_S=2048, BLOCK_C=1),
            # The fused norm + activation's backward sums from the output: leaky ReLU/PReLU and ELU inverses.
            variant(module._partial_stats_kernel, partial_stats_pointers, partial_stats_scalars,
                    BACKWARD=True, ACTIVATION=1, BLOCK_S=64, BLOCK_C=32),
            variant(module._partial_stats_kernel, partial_stats_pointers, partial_stats_scalars,
                    BACKWARD=True, ACTIVATION=2, BLOCK_S=64, BLOCK_C=32),
            variant(module._apply_kernel, apply_pointers, apply_scalars, HAS_DY=True, ACTIVATION=0, BLOCK_S=64, BLOCK_C=32),
            variant(module._apply_kernel, apply_pointers, apply_scalars, HAS_DY=False, ACTIVATION=1, BLOCK_S=64, BLOCK_C=32),
            variant(module._apply_kernel, apply_pointers, apply_scalars, HAS_DY=False, ACTIVATION=2, BLOCK_S=64, BLOCK_C=32),
            variant(module._apply_kernel, apply_pointers, apply_scalars, HAS_DY=True, ACTIVATION=2, BLOCK_S=64, BLOCK_C=32),
            variant(module._finalize_stats_kernel,
                    [("partial_mean_ptr partial_m2_ptr mean_ptr rstd_ptr scale_ptr shift_ptr", acc),
                     ("weight_ptr bias_ptr", data),
                     ("running_mean_ptr running_var_ptr new_running_mean_ptr new_running_var_ptr", "fp32")],
                    [("C S chunk num_chunks rows cols partial_sample_stride partial_row_stride stat_count", "i32"),
                     ("momentum eps", "fp32")],
                    HAS_WEIGHT=True, HAS_BIAS=True, HAS_RUNNING=True, BLOCK_R=16, BLOCK_K=8),
            variant(module._finalize_grad_kernel, finalize_grad_pointers, finalize_grad_scalars,
                    HAS_WEIGHT=True, HAS_BIAS=False, FROM_OUTPUT=False, BLOCK_R=1, BLOCK_K=64),
            variant(module._finalize_grad_kernel, finalize_grad_pointers, finalize_grad_scalars,
                    HAS_WEIGHT=True, HAS_BIAS=True, FROM_OUTPUT=True, BLOCK_R=4, BLOCK_K=64),
        ]

    # Every kernel for half-precision data; float64 only where its math differs (division, sqrt).
    half_precision = kernels("fp16", "fp32")
    double_precision = [k for k in kernels("fp64", "fp64") if k[0] is module._finalize_stats_kernel]
    for kernel, types, constants in half_precision + double_precision:
        binary = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constants),
                                target=GPUTarget("cuda", 90, 32))
        assert binary.asm["cubin"], kernel.__name__
''')


def test_kernels_compile_for_a_gpu():
    """Compiles the kernels to sm_90 cubins (Triton ships ptxas): catches what the interpreter tolerates.

    A fresh process, because compiled kernels need a triton that was imported without the interpreter.
    """
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 2):
        pytest.skip("ASTSource takes name-keyed signatures from Triton 3.2")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, TRITON_KERNELS_PATH],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
