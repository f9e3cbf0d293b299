"""Batch Renormalization (Ioffe 2017, #13): renorm layers equal Algorithm 1 of the paper, written out
here in float64, through the warm-up ramp and active clipping (outputs, gradients, running
statistics); r and d are constants in backward; BatchNorm's checkpoint layout and eval; float32
statistics under bfloat16 autocast; torch.compile and TorchScript equal eager; renorm off, at step 0
or with limits (1, 0) is batch mode bit for bit; auto mode renormalizes only its batch-mode steps."""
import copy
import io
import math

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import adanorm
from adanorm.functional import RenormClip, RenormLimits, adaptive_norm

pytestmark = pytest.mark.filterwarnings("ignore::adanorm.FallbackWarning")

LAYERS = {2: adanorm.AdaptiveNorm1d, 3: adanorm.AdaptiveNorm1d, 4: adanorm.AdaptiveNorm2d, 5: adanorm.AdaptiveNorm3d}
SHAPES = {2: (6, 4), 3: (4, 4, 5), 4: (3, 4, 3, 2), 5: (3, 4, 2, 3, 2)}
LIMITS = RenormLimits(r_max=2.0, d_max=1.0, warmup_steps=3)
STEPS = 7


def drifting_batches(shape, steps=STEPS, seed=0, dtype=torch.float32):
    """Per-channel scale and shift that jump from step to step, so the lagging running statistics
    put σ_B/σ and (μ_B − μ)/σ both inside and outside the clip limits."""
    generator = torch.Generator().manual_seed(seed)
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    batches = []
    for _ in range(steps):
        scale = torch.exp(torch.randn(shape[1], generator=generator, dtype=torch.float64) * 1.2).view(view)
        shift = (torch.randn(shape[1], generator=generator, dtype=torch.float64) * 3).view(view)
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift
        batches.append((x.to(dtype), torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)))
    return batches


def renorm_layer(rank, dtype=torch.float32, **kwargs):
    kwargs = {"mode": "batch", "renorm": True, **kwargs}
    if kwargs["renorm"]:
        kwargs = {"renorm_r_max": LIMITS.r_max, "renorm_d_max": LIMITS.d_max, "renorm_warmup_steps": LIMITS.warmup_steps,
                  **kwargs}
    layer = LAYERS[rank](4, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, -1.0, 2.0])), layer.bias.copy_(torch.tensor([0.3, -0.2, 1.0, 0.0]))
    return layer


class PaperReference:
    """Algorithm 1 of Ioffe 2017 in float64, with σ = √(running_var + ε) (BatchNorm's buffers) and the
    clip limits ramped linearly from (1, 0) over the warm-up, as the layer documents."""

    def __init__(self, layer, limits=LIMITS, momentum=0.1):
        self.weight = layer.weight.detach().double().clone().requires_grad_()
        self.bias = layer.bias.detach().double().clone().requires_grad_()
        self.mean = layer.running_mean.double().clone()
        self.var = layer.running_var.double().clone()
        self.steps = int(layer.num_batches_tracked)
        self.limits, self.momentum, self.eps = limits, momentum, layer.eps
        self.clipped = {"r": 0, "d": 0, "r_free": 0, "d_free": 0}

    def step(self, x, upstream):
        x = x.detach().to(torch.float64, copy=True).requires_grad_()
        dims = [0] + list(range(2, x.dim()))
        view = (1, -1) + (1,) * (x.dim() - 2)
        mu_b = x.mean(dims)
        sigma_b = torch.sqrt(x.var(dims, unbiased=False) + self.eps)
        sigma = torch.sqrt(self.var + self.eps)
        progress = min(self.steps / max(self.limits.warmup_steps, 1), 1.0)
        r_max = 1.0 + (self.limits.r_max - 1.0) * progress
        d_max = self.limits.d_max * progress
        r_raw = (sigma_b / sigma).detach()
        d_raw = ((mu_b - self.mean) / sigma).detach()
        r, d = r_raw.clamp(1.0 / r_max, r_max), d_raw.clamp(-d_max, d_max)
        if 0 < progress:
            self.clipped["r"] += int((r != r_raw).sum())
            self.clipped["d"] += int((d != d_raw).sum())
            self.clipped["r_free"] += int((r == r_raw).sum())
            self.clipped["d_free"] += int((d == d_raw).sum())
        x_hat = (x - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
        y = self.weight.view(view) * x_hat + self.bias.view(view)
        self.weight.grad = self.bias.grad = None
        (y * upstream.double()).sum().backward()
        self.steps += 1
        momentum = 1.0 / self.steps if self.momentum is None else self.momentum
        unbiased = x.detach().var(dims, unbiased=True)
        self.mean = self.mean + momentum * (mu_b.detach() - self.mean)
        self.var = self.var + momentum * (unbiased - self.var)
        return y.detach(), x.grad


def train_step(layer, x, upstream):
    x = x.detach().clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    (y * upstream).sum().backward()
    return y, x.grad


def assert_matches_reference(layer, reference, y, x_grad, expected, rtol, atol):
    expected_y, expected_x_grad = expected
    torch.testing.assert_close(y.double(), expected_y, rtol=rtol, atol=atol)
    torch.testing.assert_close(x_grad.double(), expected_x_grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.weight.grad.double(), reference.weight.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.bias.grad.double(), reference.bias.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.running_mean.double(), reference.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), reference.var, rtol=1e-5, atol=1e-6)
    assert int(layer.num_batches_tracked) == reference.steps


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "cumulative"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_renorm_equals_the_paper_through_warm_up_and_clipping(rank, momentum, cpu_backend):
    layer = renorm_layer(rank, momentum=momentum)
    reference = PaperReference(layer, momentum=momentum)
    for x, upstream in drifting_batches(SHAPES[rank]):
        expected = reference.step(x, upstream)
        y, x_grad = train_step(layer, x, upstream)
        assert_matches_reference(layer, reference, y, x_grad, expected, rtol=1e-4, atol=1e-5)
    assert reference.clipped["r"] and reference.clipped["d"], f"the clips were never active: {reference.clipped}"
    assert reference.clipped["r_free"] and reference.clipped["d_free"], f"the clips were always active: {reference.clipped}"
    assert reference.steps > LIMITS.warmup_steps  # the ramp and the full limits were both exercised


def test_renorm_in_float64_equals_the_paper_to_float64_precision():
    layer = renorm_layer(5, dtype=torch.float64)
    reference = PaperReference(layer)
    for x, upstream in drifting_batches(SHAPES[5], dtype=torch.float64):
        expected = reference.step(x, upstream)
        y, x_grad = train_step(layer, x, upstream)
        assert_matches_reference(layer, reference, y, x_grad, expected, rtol=1e-10, atol=1e-10)


def test_a_loaded_checkpoint_continues_the_warm_up_from_its_counter():
    native = nn.BatchNorm3d(4)
    native.running_mean.fill_(2.0), native.running_var.fill_(0.25), native.num_batches_tracked.fill_(100_000)
    layer = renorm_layer(5)
    layer.load_state_dict(native.state_dict(), strict=True)
    reference = PaperReference(layer)
    for x, upstream in drifting_batches(SHAPES[5], steps=2):
        expected = reference.step(x, upstream)
        assert_matches_reference(layer, reference, *train_step(layer, x, upstream), expected, rtol=1e-4, atol=1e-5)
    assert reference.clipped["r"] and reference.clipped["d"]


@pytest.mark.slow
def test_r_and_d_are_constants_in_backward_gradcheck():
    """Where every r and d is clipped they are locally constant, so the stop-gradient backward is the
    true derivative and gradcheck passes; where they are not, the true derivative also flows
    through r and d, and gradcheck must fail: the backward treats them as constants."""
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True)

    def renorm(running_mean, running_var, r_max, d_max):
        clip = RenormClip(torch.tensor(r_max, dtype=torch.float64), torch.tensor(d_max, dtype=torch.float64))

        def function(x, weight, bias):
            return adaptive_norm(x, "batch", weight, bias, running_mean.clone(), running_var.clone(), training=True,
                                 renorm=clip)
        return function

    far = (torch.full((2,), -10.0, dtype=torch.float64), torch.full((2,), 0.01, dtype=torch.float64))
    assert torch.autograd.gradcheck(renorm(*far, 2.0, 1.0), (x, weight, bias))  # r = 2, d = 1: clipped
    assert torch.autograd.gradcheck(renorm(*far, 1.0, 0.0), (x, weight, bias))  # r = 1, d = 0: batch norm
    near = (torch.full((2,), 0.1, dtype=torch.float64), torch.full((2,), 0.9, dtype=torch.float64))
    assert not torch.autograd.gradcheck(renorm(*near, 5.0, 5.0), (x, weight, bias), raise_exception=False)


def test_state_dict_is_batchnorm3d_in_both_directions_and_eval_equals_batchnorm():
    layer = renorm_layer(5)
    for x, upstream in drifting_batches(SHAPES[5], steps=4):
        train_step(layer, x, upstream)
    native = nn.BatchNorm3d(4)
    assert list(layer.state_dict()) == list(native.state_dict())
    native.load_state_dict(layer.state_dict(), strict=True)
    fresh = renorm_layer(5)
    fresh.load_state_dict(native.state_dict(), strict=True)
    probe = torch.randn(2, 4, 3, 3, 3)
    layer.eval(), native.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(probe), native(probe), rtol=0, atol=0)
        torch.testing.assert_close(fresh(probe), native(probe), rtol=0, atol=0)


def test_bfloat16_autocast_keeps_float32_statistics_and_the_native_output_dtype():
    layer = renorm_layer(5)
    native = nn.BatchNorm3d(4)
    reference = PaperReference(layer)
    for x, upstream in drifting_batches(SHAPES[5]):
        x, upstream = x.bfloat16(), upstream.bfloat16()
        expected_y, expected_x_grad = reference.step(x, upstream)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, x_grad = train_step(layer, x, upstream)
            native_dtype = native(x).dtype
        assert y.dtype == native_dtype == torch.bfloat16 and x_grad.dtype == torch.bfloat16
        assert layer.running_mean.dtype == layer.weight.grad.dtype == torch.float32
        # Statistics of the bfloat16 values, accumulated in float32: float32 precision, not bfloat16's 3 digits.
        torch.testing.assert_close(layer.running_mean.double(), reference.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), reference.var, rtol=1e-5, atol=1e-5)
        # The output and gradients are rounded to bfloat16 (8 bits of mantissa): a few units in the last place.
        scale = expected_y.abs().max()
        torch.testing.assert_close(y.double(), expected_y, rtol=2e-2, atol=2e-2 * scale)
        torch.testing.assert_close(x_grad.double(), expected_x_grad, rtol=3e-2, atol=3e-2 * expected_x_grad.abs().max())
        torch.testing.assert_close(layer.weight.grad.double(), reference.weight.grad, rtol=2e-2, atol=0.1)
        torch.testing.assert_close(layer.bias.grad.double(), reference.bias.grad, rtol=2e-2, atol=0.1)
    assert reference.clipped["r"] and reference.clipped["d"]


@pytest.mark.slow
def test_torch_compile_fullgraph_equals_eager_without_recompiling_through_the_warm_up():
    eager = nn.Sequential(nn.Conv3d(2, 4, 1), renorm_layer(5))
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    batches = drifting_batches((3, 2, 2, 3, 2))
    try:
        for training in (True, False):
            eager.train(training), compiled_model.train(training)
            for x, _ in batches:
                for model in (eager, compiled_model):
                    model.zero_grad()
                y_eager, y_compiled = eager(x), compiled(x)
                torch.testing.assert_close(y_compiled, y_eager, rtol=1e-4, atol=1e-5)
                if training:
                    y_eager.square().mean().backward(), y_compiled.square().mean().backward()
                    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
                        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
                for (name, a), b in zip(eager.named_buffers(), compiled_model.buffers()):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        torch._dynamo.reset()
        counted = torch.compile(copy.deepcopy(eager).train(), backend=counter, fullgraph=True)
        for x, _ in batches:  # across the ramp and past it: the limits are tensors, nothing to guard on
            counted(x)
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


def test_a_dynamic_batch_compiles_once_and_an_empty_batch_compiles():
    eager = renorm_layer(5)
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(copy.deepcopy(eager), backend=counter, fullgraph=True, dynamic=True)
        for batch in (5, 7, 9):  # none equal to a spatial size: dynamo would duck-size them together
            x, _ = drifting_batches((batch, 4, 2, 3, 2), steps=1, seed=batch)[0]
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
        assert counter.frame_count == 1
        torch._dynamo.reset()
        empty = torch.compile(renorm_layer(5), backend="aot_eager", fullgraph=True)(torch.randn(0, 4, 2, 3, 2))
        assert empty.shape == (0, 4, 2, 3, 2)
    finally:
        torch._dynamo.reset()


def test_scripted_renorm_layer_equals_eager_and_survives_save_load():
    eager = renorm_layer(5, mode="auto", policy=adanorm.Policy(min_batch_size=3))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(copy.deepcopy(eager)), buffer)
    buffer.seek(0)
    scripted = torch.jit.load(buffer)
    batches = drifting_batches(SHAPES[5]) + drifting_batches((2, 4, 2, 3, 2), steps=2, seed=1)  # batch, then group
    for training in (True, False):
        eager.train(training), scripted.train(training)
        for x, upstream in batches:
            torch.testing.assert_close(train_step(scripted, x, upstream) if training else scripted(x),
                                       train_step(eager, x, upstream) if training else eager(x), rtol=1e-5, atol=1e-6)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(scripted.state_dict()[key], value, msg=key)


def test_renorm_off_at_step_zero_or_with_limits_one_zero_is_batch_mode_bit_for_bit():
    plain = renorm_layer(5, renorm=False, renorm_r_max=3.0, renorm_d_max=5.0, renorm_warmup_steps=10_000)  # defaults
    no_warmup = renorm_layer(5, renorm_warmup_steps=0)  # step 0 is still plain: the statistics are not learned yet
    identity_limits = renorm_layer(5, renorm_r_max=1.0, renorm_d_max=0.0, renorm_warmup_steps=0)
    batches = drifting_batches(SHAPES[5], steps=3)
    for step, (x, upstream) in enumerate(batches):
        y, x_grad = train_step(plain, x, upstream)
        y_identity, x_grad_identity = train_step(identity_limits, x, upstream)
        assert torch.equal(y_identity, y) and torch.equal(x_grad_identity, x_grad)
        assert torch.equal(identity_limits.running_var, plain.running_var)
        if step == 0:
            y_first, x_grad_first = train_step(no_warmup, x, upstream)
            assert torch.equal(y_first, y) and torch.equal(x_grad_first, x_grad)
    untracked = renorm_layer(5, track_running_stats=False)  # nothing to renormalize toward
    untracked_plain = renorm_layer(5, renorm=False, track_running_stats=False)
    for x, upstream in batches:
        assert torch.equal(train_step(untracked, x, upstream)[0], train_step(untracked_plain, x, upstream)[0])


def test_auto_mode_renormalizes_its_batch_steps_only():
    renorm = renorm_layer(5, mode="auto", policy=adanorm.Policy(min_batch_size=3))
    plain = renorm_layer(5, mode="auto", renorm=False, policy=adanorm.Policy(min_batch_size=3))
    reference = PaperReference(renorm)
    for x, upstream in drifting_batches(SHAPES[5], steps=5):  # batch 3: batch mode
        expected = reference.step(x, upstream)
        assert_matches_reference(renorm, reference, *train_step(renorm, x, upstream), expected, rtol=1e-4, atol=1e-5)
        train_step(plain, x, upstream)
        assert renorm.last_mode == "batch"
    for x, upstream in drifting_batches((2, 4, 2, 3, 2), steps=2, seed=1):  # batch 2: group mode, untouched
        y, x_grad = train_step(renorm, x, upstream)
        y_plain, x_grad_plain = train_step(plain, x, upstream)
        assert renorm.last_mode == "group"
        assert torch.equal(y, y_plain) and torch.equal(x_grad, x_grad_plain)
    assert int(renorm.num_batches_tracked) == 5


def test_channels_last_input_keeps_its_layout():
    layer, twin = renorm_layer(5), renorm_layer(5)
    for x, upstream in drifting_batches(SHAPES[5], steps=5):
        y_last, _ = train_step(layer, x.contiguous(memory_format=torch.channels_last_3d), upstream)
        y, _ = train_step(twin, x, upstream)
        assert y_last.is_contiguous(memory_format=torch.channels_last_3d)
        # the two layouts reduce in different orders; five steps of float32 rounding reach a few 1e-6
        torch.testing.assert_close(y_last, y, rtol=1e-4, atol=1e-5)


def test_convert_turns_renorm_on_for_batchnorm_layers_and_revert_keeps_the_state():
    model = nn.Sequential(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4), nn.Conv3d(4, 4, 1), nn.GroupNorm(2, 4))
    converted = adanorm.convert(copy.deepcopy(model), renorm=True, renorm_warmup_steps=100)
    assert converted[1].renorm_limits == RenormLimits(3.0, 5.0, 100)
    assert converted[3].renorm_limits is not None and converted[3].policy.chain[0] == "group"  # never in batch mode
    converted(torch.randn(4, 2, 2, 2, 2)).sum().backward()
    reverted = adanorm.revert(converted)
    assert type(reverted[1]) is nn.BatchNorm3d and int(reverted[1].num_batches_tracked) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"renorm_r_max": 0.5}, "renorm_r_max=0.5 is invalid"),
    ({"renorm_r_max": math.inf}, "renorm_r_max=inf is invalid"),
    ({"renorm_d_max": -1.0}, "renorm_d_max=-1.0 is invalid"),
    ({"renorm_warmup_steps": -1}, "renorm_warmup_steps=-1 is invalid"),
    ({"renorm_warmup_steps": 2.5}, "renorm_warmup_steps=2.5 is invalid"),
    ({"renorm": False, "renorm_r_max": 2.0}, "has no effect without renorm=True"),
])
def test_invalid_limits_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=f"AdaptiveNorm3d: .*{message}"):
        adanorm.AdaptiveNorm3d(4, **{"renorm": True, **kwargs})
    with pytest.raises(TypeError, match="renorm=1 must be True or False"):
        adanorm.AdaptiveNorm3d(4, renorm=1)


def synced_renorm_steps(rank, sizes, steps):
    from test_distributed import local_slice

    layer = renorm_layer(5, dtype=torch.float64, sync=True)
    outputs = []
    for x, upstream in drifting_batches((sum(sizes), 4, 2, 2, 2), steps=steps, dtype=torch.float64):
        y, x_grad = train_step(layer, local_slice(x, sizes, rank), local_slice(upstream, sizes, rank))
        outputs.append((y.detach(), x_grad))
    return outputs, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var


@pytest.mark.slow
def test_synced_renorm_equals_one_process_on_the_concatenated_batch(tmp_path):
    from test_distributed import WORLD, run_on_two_ranks

    sizes, steps = (1, 3), 5
    results = run_on_two_ranks(tmp_path, synced_renorm_steps, sizes, steps)
    layer = renorm_layer(5, dtype=torch.float64)
    reference = PaperReference(layer)
    for step, (x, upstream) in enumerate(drifting_batches((sum(sizes), 4, 2, 2, 2), steps=steps, dtype=torch.float64)):
        expected_y, expected_x_grad = reference.step(x, upstream)
        torch.testing.assert_close(torch.cat([results[r][0][step][0] for r in range(WORLD)]), expected_y)
        torch.testing.assert_close(torch.cat([results[r][0][step][1] for r in range(WORLD)]), expected_x_grad)
    torch.testing.assert_close(results[0][1] + results[1][1], reference.weight.grad)
    torch.testing.assert_close(results[0][2] + results[1][2], reference.bias.grad)
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank][3], reference.mean)
        torch.testing.assert_close(results[rank][4], reference.var)
    assert reference.clipped["r"] and reference.clipped["d"]
