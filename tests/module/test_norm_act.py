"""AdaptiveNormAct: a norm and an invertible activation fused, checked against the native pair it replaces.

The reference is PyTorch's own norm followed by its own activation. Accuracy is measured against the same
native pair in float64: in float32 the fused step must stay within a small multiple of the native pair's
own error, since it reconstructs the pre-activation from the rounded output."""
import copy
import io
from contextlib import contextmanager
from unittest import mock

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import adanorm
from adanorm.functional import cpu_ops, dispatch
from adanorm.functional.norm_act import normalize_activate

MODES = ("batch", "instance", "group", "layer")
ACTIVATIONS = ("leaky_relu", "elu", "prelu", "identity")
GROUPS = 4


BACKENDS = ("compiled", "tensor_ops")
"""The fused step's two forms: the compiled CPU operators, and the same algebra as tensor operations (CUDA
without Triton, ADANORM_CPU_KERNEL=0)."""


@contextmanager
def fused_backend(name):
    """Runs the fused step on ``name``'s form; for "compiled", checks that its operators ran."""
    if name == "tensor_ops":
        with mock.patch.object(dispatch, "norm_activation_backend", lambda input: "tensor_ops"):
            yield
        return
    kernels = cpu_ops.load(build_wait_s=600.0)
    assert kernels is not None, "the compiled CPU kernels must build here"
    assert dispatch.norm_activation_backend(torch.ones(1)) == "cpu"
    calls = []
    counted = {name: (lambda operator: lambda *args: calls.append(1) or operator(*args))(getattr(kernels, name))
               for name in ("norm_activation", "norm_activation_")}
    with mock.patch.multiple(kernels, **counted):
        yield
    assert calls, "the compiled operator ran"


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fused_backend(request.param):
        yield request.param


def native_pair(x, mode, weight, bias, prelu_weight, activation, negative_slope=0.01, alpha=1.0):
    if mode == "batch":
        z = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
    else:
        z = F.group_norm(x, {"instance": x.shape[1], "group": GROUPS, "layer": 1}[mode], weight, bias, 1e-5)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "elu":
        return F.elu(z, alpha)
    if activation == "prelu":
        return F.prelu(z, prelu_weight)
    return z


def fused_step(x, mode, weight, bias, prelu_weight, activation, inplace=False, negative_slope=0.01, alpha=1.0):
    return normalize_activate(x, mode, weight, bias, None, None, True, 0.1, 1e-5, GROUPS, None, None, False, activation,
                              negative_slope, alpha, prelu_weight if activation == "prelu" else None, inplace)


def run(step, x0, weight0, bias0, prelu0, grad_output, dtype, channels_last, mode, **kwargs):
    """Output and gradients of input, γ, β (and the PReLU slopes) for one step in ``dtype``."""
    x = x0.to(dtype).clone()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    leaves = [x] + [t.to(dtype).clone().requires_grad_() for t in (weight0, bias0, prelu0)]
    output = step(x * 1.0, mode, *leaves[1:], **kwargs)  # a non-leaf input, as a convolution's output
    grads = torch.autograd.grad(output, leaves, grad_output.to(dtype), allow_unused=True)
    return [output.detach().double()] + [None if g is None else g.double() for g in grads]


def sample(shape, seed, scale=3.0, shift=1.0):
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=torch.float64) * 0.5
    prelu = torch.rand(channels, generator=generator, dtype=torch.float64) * 0.3 + 0.05
    return x, weight, bias, prelu, torch.randn(shape, generator=generator, dtype=torch.float64)


def assert_within_native_error(fused32, native32, native64, factor=8.0):
    """Each result's float32 error against float64 is at most ``factor`` times the native pair's, plus
    a few float32 ulps of the result's scale (an error that happens to round to zero natively)."""
    for index, (fused, native, reference) in enumerate(zip(fused32, native32, native64)):
        if reference is None:
            continue
        fused_error = (fused - reference).abs().max().item()
        native_error = (native - reference).abs().max().item()
        ulps = 4 * torch.finfo(torch.float32).eps * reference.abs().max().item()
        assert fused_error <= factor * native_error + ulps, (index, fused_error, native_error)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_fused_step_equals_native_norm_and_activation(mode, activation, channels_last, backend):
    x, weight, bias, prelu, grad_output = sample((2, 8, 5, 6, 7), seed=0)
    results = {}
    for name, step, dtype in (("native64", native_pair, torch.float64), ("native32", native_pair, torch.float32),
                              ("fused64", fused_step, torch.float64), ("fused32", fused_step, torch.float32)):
        results[name] = run(step, x, weight, bias, prelu, grad_output, dtype, channels_last, mode, activation=activation)
    for fused, reference in zip(results["fused64"], results["native64"]):
        if reference is not None:
            torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)
    assert_within_native_error(results["fused32"], results["native32"], results["native64"])


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 4), per_group=st.integers(1, 5), spatial=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       mode=st.sampled_from(MODES), activation=st.sampled_from(ACTIVATIONS), seed=st.integers(0, 2**16),
       scale=st.floats(0.01, 100.0), shift=st.floats(-50.0, 50.0), channels_last=st.booleans(),
       backend_name=st.sampled_from(BACKENDS))
@pytest.mark.slow
def test_fused_step_equals_native_in_float64_on_any_shape(batch, per_group, spatial, mode, activation, seed, scale, shift,
                                                          channels_last, backend_name):
    shape = (batch, GROUPS * per_group, *spatial)
    values_per_statistic = {"batch": batch, "instance": 1, "group": per_group, "layer": GROUPS * per_group}[mode]
    for extent in spatial:
        values_per_statistic *= extent
    if values_per_statistic < 2:
        return  # both raise: covered by test_single_value_statistics_raise_as_natively
    x, weight, bias, prelu, grad_output = sample(shape, seed, scale, shift)
    channels_last = channels_last and x.dim() == 5
    with fused_backend(backend_name):
        fused = run(fused_step, x, weight, bias, prelu, grad_output, torch.float64, channels_last, mode, activation=activation)
    native = run(native_pair, x, weight, bias, prelu, grad_output, torch.float64, channels_last, mode, activation=activation)
    for got, expected in zip(fused, native):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * max(1.0, expected.abs().max().item()))


def test_single_value_statistics_raise_as_natively():
    x = torch.randn(1, 4, 1, 1, 1, requires_grad=True)
    with pytest.raises(ValueError, match="single value"):
        fused_step(x * 1.0, "batch", None, None, None, "leaky_relu")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_non_finite_values_spread_as_natively(activation, channels_last, backend):
    """A NaN or ∞ in one (sample, group) poisons its statistics: output and input gradient are NaN exactly where
    the native pair's are, and equal elsewhere (the compiled kernels pick the activation's sides without branches)."""
    x, weight, bias, prelu, grad_output = sample((2, 8, 3, 4, 5), seed=2)
    x[0, 0, 1, 2, 3], x[1, 5, 0, 0, 0] = float("nan"), float("inf")
    native = run(native_pair, x, weight, bias, prelu, grad_output, torch.float32, channels_last, "group",
                 activation=activation)
    fused = run(fused_step, x, weight, bias, prelu, grad_output, torch.float32, channels_last, "group",
                activation=activation)
    for index in (0, 1):  # output, input gradient
        assert torch.equal(fused[index].isnan(), native[index].isnan()), index
        torch.testing.assert_close(fused[index], native[index], equal_nan=True, rtol=1e-4, atol=1e-4)


def saved_storages(step):
    """Bytes of every distinct storage autograd keeps for backward while ``step()`` runs: (total, largest)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = step()
    return output, sum(storages.values()), storages


@pytest.mark.parametrize("activation", ["leaky_relu", "prelu", "elu"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_step_saves_its_output_and_per_statistic_vectors_only(mode, activation, backend):
    x = torch.randn(2, 8, 8, 8, 8, requires_grad=True)
    weight, bias = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    prelu = torch.full((8,), 0.25, requires_grad=True)
    conv_output = x * 1.0
    output, total, storages = saved_storages(lambda: fused_step(conv_output, mode, weight, bias, prelu, activation))
    full_size = [nbytes for nbytes in storages.values() if nbytes >= output.nbytes]
    assert full_size == [output.nbytes], "one full-size tensor: the output"
    assert output.untyped_storage().data_ptr() in storages
    assert total - output.nbytes <= 64 * 8 * 8, "besides it only (N, C)-sized vectors"
    _, native_total, _ = saved_storages(lambda: native_pair(x * 1.0, mode, weight, bias, prelu, activation))
    assert native_total >= 2 * output.nbytes, "the native pair keeps its input and its pre-activation"


def test_inplace_step_writes_into_a_fresh_input_and_never_into_a_leaf_a_view_or_a_saved_tensor(backend):
    x = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    fresh = x * 2.0
    output = fused_step(fresh, "group", None, None, None, "leaky_relu", inplace=True)
    assert output.data_ptr() == fresh.data_ptr()
    expected = F.leaky_relu(F.group_norm(x * 2.0, GROUPS))
    torch.testing.assert_close(output, expected)
    grad, = torch.autograd.grad(output.sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0])

    leaf = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    assert fused_step(leaf, "group", None, None, None, "leaky_relu", inplace=True).data_ptr() != leaf.data_ptr()
    base = x * 1.0
    view = base[:, :8]
    assert fused_step(view, "group", None, None, None, "leaky_relu", inplace=True).data_ptr() != view.data_ptr()
    weight = torch.randn(8, 1, 1, 1, requires_grad=True)
    needed_elsewhere = x * 3.0
    product = needed_elsewhere * weight  # saves needed_elsewhere for weight's gradient
    output = fused_step(needed_elsewhere, "group", None, None, None, "leaky_relu", inplace=True)
    assert output.data_ptr() != needed_elsewhere.data_ptr()
    got = torch.autograd.grad(output.sum() + product.sum(), [x, weight])
    reference = torch.autograd.grad(F.leaky_relu(F.group_norm(x * 3.0, GROUPS)).sum() + (x * 3.0 * weight).sum(), [x, weight])
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b)
    saved_by_its_producer = torch.exp(x)  # exp's backward reads its own output
    output = fused_step(saved_by_its_producer, "group", None, None, None, "leaky_relu", inplace=True)
    assert output.data_ptr() != saved_by_its_producer.data_ptr()
    output.sum().backward()  # no "modified by an inplace operation" error
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mode", ["batch", "group"])
@pytest.mark.parametrize("activation", ["leaky_relu", "prelu", "elu"])
@pytest.mark.parametrize("weight_values", [[0.0, 1.0, 1.0, 1.0], [1e-6, 1.0, 1.0, 1.0]], ids=["zero", "tiny_vs_shift"])
def test_small_gamma_keeps_the_input_and_gradients_stay_native(weight_values, activation, mode, backend):
    """A channel with γ = 0 erases x̂, and one with |γ| ≪ |β| amplifies the output's rounding: such a step keeps
    its input, as the native ops do (the compiled operator then runs the plain norm's backward from it; the other
    forms run the native ops; docs/fused.md), so the gradients stay the native ones, also when asked to work in
    place."""
    weight = torch.tensor(weight_values * 2, requires_grad=True)
    bias = torch.full((8,), 0.5, requires_grad=True)
    prelu = torch.full((8,), 0.25, requires_grad=True)
    x = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    conv_output = x * 1.0
    output, total, _ = saved_storages(lambda: fused_step(conv_output, mode, weight, bias, prelu, activation, inplace=True))
    assert total >= 2 * output.nbytes, "the input is kept besides the output"
    leaves = [x, weight, bias] + ([prelu] if activation == "prelu" else [])
    grad_output = torch.randn_like(output)
    got = torch.autograd.grad(output, leaves, grad_output)
    expected = torch.autograd.grad(native_pair(x * 1.0, mode, weight, bias, prelu, activation), leaves, grad_output)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_double_backward_raises_where_it_is_attempted_with_the_fix(backend):
    """The fused step keeps no input to differentiate its gradients with: create_graph=True still gives the
    first-order gradients, and only differentiating them again raises, naming the unfused layers."""
    x = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    weight, bias = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    output = fused_step(x * 1.0, "group", weight, bias, None, "leaky_relu")
    grad, = torch.autograd.grad(output.pow(2).sum(), x, create_graph=True)
    expected, = torch.autograd.grad(native_pair(x * 1.0, "group", weight, bias, None, "leaky_relu").pow(2).sum(), x)
    torch.testing.assert_close(grad, expected)
    with pytest.raises(RuntimeError, match="differentiate(d)? twice"):
        grad.sum().backward()


def test_layer_trains_and_evaluates_as_the_adaptive_layer_followed_by_the_activation():
    torch.manual_seed(0)
    fused = adanorm.AdaptiveNormAct3d(8, activation="prelu", num_parameters=8)
    norm, activation = adanorm.AdaptiveNorm3d(8), copy.deepcopy(fused.activation)
    for batch in (2, 40, 2, 40):  # group statistics, then batch statistics that update the running ones
        x = torch.randn(batch, 8, 4, 4, 4)
        torch.testing.assert_close(fused(x), activation(norm(x)))
        assert fused.last_mode == norm.last_mode
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(norm, name))
    fused.eval(), norm.eval()
    x = torch.randn(1, 8, 1, 1, 1)
    torch.testing.assert_close(fused(x), activation(norm(x)))


def test_state_dict_is_the_norms_plus_the_activations_parameters():
    assert sorted(adanorm.AdaptiveNormAct3d(8).state_dict()) == sorted(nn.BatchNorm3d(8).state_dict())
    prelu = adanorm.AdaptiveNormAct3d(8, activation="prelu", track_running_stats=False)
    assert sorted(prelu.state_dict()) == ["activation.weight", "bias", "weight"]


def test_batchnorm_and_leaky_relu_checkpoint_loads_strictly_into_the_fused_pair():
    torch.manual_seed(0)
    native = nn.Sequential(nn.Conv3d(1, 8, 3), nn.BatchNorm3d(8), nn.LeakyReLU(0.1))
    native.train()(torch.randn(4, 1, 6, 6, 6))  # running statistics that are not the initial ones
    checkpoint = io.BytesIO()
    torch.save(native.state_dict(), checkpoint)
    fused = adanorm.convert(nn.Sequential(nn.Conv3d(1, 8, 3), nn.BatchNorm3d(8), nn.LeakyReLU(0.1)), fuse_activation=True)
    assert isinstance(fused[1], adanorm.AdaptiveNormAct3d) and isinstance(fused[2], nn.Identity)
    checkpoint.seek(0)
    fused.load_state_dict(torch.load(checkpoint), strict=True)
    x = torch.randn(2, 1, 6, 6, 6)
    torch.testing.assert_close(fused.eval()(x), native.eval()(x))
    assert fused.state_dict().keys() == native.state_dict().keys()


@pytest.mark.parametrize("activation, message", [
    ("relu", "ReLU maps every negative input to 0"),
    (nn.ReLU(), "ReLU is not invertible"),
    (nn.LeakyReLU(0.0), "negative_slope > 0"),
    (nn.ELU(alpha=-1.0), "alpha > 0"),
    ("swish", "not one of"),
])
def test_activations_that_cannot_be_inverted_are_refused_with_the_fix(activation, message):
    with pytest.raises(ValueError, match=message):
        adanorm.AdaptiveNormAct3d(8, activation=activation)


def test_prelu_slopes_that_turn_non_positive_keep_the_native_ops():
    layer = adanorm.AdaptiveNormAct3d(4, activation="prelu")
    with torch.no_grad():
        layer.activation.weight.fill_(-0.1)
    x = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    got = torch.autograd.grad(layer(x * 1.0).sum(), x)[0]
    reference = adanorm.AdaptiveNorm3d(4)
    expected = torch.autograd.grad(F.prelu(reference(x * 1.0), layer.activation.weight.detach()).sum(), x)[0]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode, activation, channels_last, backend):
    if backend == "tensor_ops" and channels_last:
        pytest.skip("the tensor-op form reads no layout (every op is elementwise or a reduction over named dims); "
                    "its channels-last results are checked against native by the hypothesis test")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 3, 3, 3, dtype=torch.float64, generator=generator)
    x = (x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x).requires_grad_()
    weight = (torch.rand(8, dtype=torch.float64, generator=generator) + 0.5).requires_grad_()
    bias = (torch.randn(8, dtype=torch.float64, generator=generator) * 0.3).requires_grad_()
    prelu = (torch.rand(8, dtype=torch.float64, generator=generator) * 0.3 + 0.05).requires_grad_()
    inputs = (x, weight, bias) + ((prelu,) if activation == "prelu" else ())

    def step(x, weight, bias, *prelu_weight):
        return fused_step(x * 1.0, mode, weight, bias, prelu_weight[0] if prelu_weight else None, activation)

    assert torch.autograd.gradcheck(step, inputs)


@pytest.mark.slow
def test_onnx_export_of_the_fused_layer_runs_in_onnxruntime_like_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    layer = adanorm.AdaptiveNormAct3d(8, activation="prelu", num_parameters=8)
    layer(torch.randn(40, 8, 4, 4, 4))  # learned running statistics: eval reads them
    layer.eval()
    x = torch.randn(2, 8, 4, 4, 4)
    for dynamo in (False, True):
        path = tmp_path / f"fused-{dynamo}.onnx"
        torch.onnx.export(layer, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=dynamo)
        session = ort.InferenceSession(str(path))
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_scripted_traced_and_exported_forms_are_the_unfused_native_pair():
    torch.manual_seed(0)
    layer = adanorm.AdaptiveNormAct3d(8, activation="leaky_relu", negative_slope=0.2)
    x = torch.randn(2, 8, 4, 4, 4)
    eager = copy.deepcopy(layer)(x)
    compiled = torch.compile(copy.deepcopy(layer), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)
    scripted = torch.jit.script(copy.deepcopy(layer))
    torch.testing.assert_close(scripted(x), eager)
    traced = torch.jit.trace(copy.deepcopy(layer), (x,), check_trace=False)
    assert "adanorm::" not in str(traced.graph)
    torch.testing.assert_close(traced(x), eager)
    exported = torch.export.export(copy.deepcopy(layer), (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not any("adanorm" in target for target in targets), targets
    assert any("leaky_relu" in target for target in targets), targets
    torch.testing.assert_close(exported.module()(x), eager)
