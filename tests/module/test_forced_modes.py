"""Every forced mode against the native PyTorch module it stands in for."""
import itertools

import pytest
import torch
from torch import nn

import adanorm
from adanorm.functional import adaptive_norm

# Every test here runs on the native CPU kernels and again on the compiled fused ones (conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_backend")

ADAPTIVE_BY_RANK = {3: adanorm.AdaptiveNorm1d, 4: adanorm.AdaptiveNorm2d, 5: adanorm.AdaptiveNorm3d}
BATCH_BY_RANK = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
INSTANCE_BY_RANK = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}

SHAPES = [(2, 4, 3, 5, 2), (1, 8, 4, 4, 4), (3, 6, 1, 1, 2), (4, 16, 2, 3, 3), (2, 32, 1, 1, 1), (2, 6, 5, 7)]


class AffineReference(nn.Module):
    """γ·x+β written out independently of adanorm, for identity mode."""

    def __init__(self, num_features, affine):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def forward(self, x):
        if self.weight is None:
            return x
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(view) + self.bias.view(view)


def native_module(mode, num_features, eps, momentum, affine, track, num_groups, rank):
    if mode == "batch":
        return BATCH_BY_RANK[rank](num_features, eps, momentum, affine, track)
    if mode == "instance":
        return INSTANCE_BY_RANK[rank](num_features, eps, affine=affine)
    if mode == "group":
        return nn.GroupNorm(num_groups, num_features, eps, affine)
    if mode == "layer":
        return nn.GroupNorm(1, num_features, eps, affine)
    return AffineReference(num_features, affine)


def native_can_run(mode, shape, training, track, num_groups):
    n, c, spatial = shape[0], shape[1], torch.Size(shape[2:]).numel()
    if mode == "batch":
        return n * spatial > 1 or (not training and track)
    if mode == "instance":
        return spatial > 1
    if mode == "group":
        return c // num_groups * spatial > 1
    if mode == "layer":
        return c * spatial > 1
    return True


def to_layout(x, channels_last):
    return x.contiguous(memory_format=CHANNELS_LAST[x.dim()]) if channels_last else x


def assert_same_step(adaptive, native, x, atol, rtol):
    """One forward+backward through both layers on the same input and upstream gradient."""
    x_adaptive = x.detach().clone().requires_grad_()
    x_native = x.detach().clone().requires_grad_()
    y_adaptive, y_native = adaptive(x_adaptive), native(x_native)
    torch.testing.assert_close(y_adaptive, y_native, atol=atol, rtol=rtol)
    grad = torch.randn_like(y_native)
    y_adaptive.backward(grad)
    y_native.backward(grad)
    torch.testing.assert_close(x_adaptive.grad, x_native.grad, atol=atol, rtol=rtol)
    for name in ("weight", "bias"):
        param = getattr(adaptive, name)
        if param is not None:
            torch.testing.assert_close(param.grad, getattr(native, name).grad, atol=atol, rtol=rtol)
    return y_adaptive


CASES = list(
    itertools.product(
        ["batch", "instance", "group", "layer", "identity"],
        SHAPES,
        [torch.float32, torch.float64],
        [False, True],  # channels_last
        [(True, True), (False, True), (True, False)],  # (affine, track_running_stats)
    )
)


@pytest.mark.parametrize("mode,shape,dtype,channels_last,flags", CASES)
def test_forced_mode_matches_native(mode, shape, dtype, channels_last, flags):
    affine, track = flags
    rank = len(shape)
    if channels_last and rank not in CHANNELS_LAST:
        pytest.skip("no channels-last layout for this rank")
    num_features, num_groups = shape[1], 2
    eps, momentum = 1e-3, 0.3
    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-10, 1e-8)
    native = native_module(mode, num_features, eps, momentum, affine, track, num_groups, rank).to(dtype)
    adaptive = ADAPTIVE_BY_RANK[rank](
        num_features, eps, momentum, affine, track, mode=mode, num_groups=num_groups, dtype=dtype
    )
    if affine:
        with torch.no_grad():
            native.weight.uniform_(0.5, 1.5)
            native.bias.uniform_(-0.5, 0.5)
        adaptive.load_state_dict(native.state_dict(), strict=mode in ("batch",))

    for training in (True, False):
        adaptive.train(training)
        native.train(training)
        steps = 3 if training else 1
        for _ in range(steps):
            x = to_layout(torch.randn(shape, dtype=dtype) * 3 + 1, channels_last)
            if not native_can_run(mode, shape, training, track, num_groups):
                with pytest.raises(ValueError, match=f"mode='{mode}'.*{tuple(shape)}".replace("(", r"\(").replace(")", r"\)")):
                    adaptive(x)
                continue
            y = assert_same_step(adaptive, native, x, atol, rtol)
            if channels_last and rank in CHANNELS_LAST:
                assert y.is_contiguous(memory_format=CHANNELS_LAST[rank]), "output lost channels-last layout"
            assert adaptive.last_mode == mode
        if mode == "batch" and track:
            torch.testing.assert_close(adaptive.running_mean, native.running_mean, atol=atol, rtol=rtol)
            torch.testing.assert_close(adaptive.running_var, native.running_var, atol=atol, rtol=rtol)
            assert int(adaptive.num_batches_tracked) == int(native.num_batches_tracked)


@pytest.mark.parametrize("momentum", [None, 0.01, 1.0])
def test_batch_running_stats_follow_native_momentum(momentum):
    native = nn.BatchNorm3d(5, momentum=momentum)
    adaptive = adanorm.AdaptiveNorm3d(5, momentum=momentum, mode="batch")
    for step in range(6):
        x = torch.randn(2, 5, 3, 3, 3) * (step + 1) + step
        torch.testing.assert_close(adaptive(x), native(x))
    torch.testing.assert_close(adaptive.running_mean, native.running_mean)
    torch.testing.assert_close(adaptive.running_var, native.running_var)


GRADCHECK_CASES = [
    ("batch", (3, 4, 2, 3, 2), False),
    ("batch", (3, 4, 2, 3, 2), True),
    ("instance", (2, 3, 2, 3, 2), False),
    ("instance", (2, 3, 2, 3, 2), True),
    ("instance", (2, 3, 3, 4), True),
    ("group", (2, 6, 2, 2, 3), False),
    ("group", (2, 6, 2, 2, 3), True),
    ("layer", (2, 4, 1, 2, 3), False),
    ("layer", (2, 4, 1, 2, 3), True),
    ("identity", (2, 4, 1, 1, 1), False),
]


@pytest.mark.parametrize("mode,shape,channels_last", GRADCHECK_CASES)
def test_gradcheck_float64(mode, shape, channels_last):
    x = to_layout(torch.randn(shape, dtype=torch.float64), channels_last).requires_grad_()
    weight = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(shape[1], dtype=torch.float64).requires_grad_()

    def run(x, weight, bias):
        return adaptive_norm(x, mode, weight, bias, training=True, eps=1e-5, num_groups=2)

    assert torch.autograd.gradcheck(run, (x, weight, bias))


# PyTorch's own module-test generators, as an independent source of cases.
common_modules = pytest.importorskip("torch.testing._internal.common_modules")
MODULE_DB = [m for m in common_modules.module_db
             if m.module_cls in BATCH_BY_RANK.values() or m.module_cls in INSTANCE_BY_RANK.values() or m.module_cls is nn.GroupNorm]


def forced_twin(native):
    """The forced-mode adaptive layer that must reproduce ``native``."""
    if isinstance(native, nn.GroupNorm):
        return adanorm.AdaptiveNorm(
            native.num_channels, native.eps, affine=native.affine, track_running_stats=False,
            bias=native.bias is not None or not native.affine, mode="group", num_groups=native.num_groups,
        )
    mode = "batch" if isinstance(native, nn.modules.batchnorm._BatchNorm) else "instance"
    track = native.track_running_stats if mode == "batch" else False
    return adanorm.AdaptiveNorm(
        native.num_features, native.eps, native.momentum, native.affine, track,
        bias=native.bias is not None or not native.affine, mode=mode,
    )


@pytest.mark.parametrize("module_info", MODULE_DB, ids=lambda m: m.module_cls.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pytorch_module_inputs(module_info, dtype):
    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-10, 1e-8)
    for training in (True, False):
        inputs = module_info.module_inputs_func(module_info, device="cpu", dtype=dtype, requires_grad=False, training=training)
        for case in inputs:
            x = case.forward_input.args[0]
            if x.dim() < 2 or (x.dim() == len(case.forward_input.args[0].shape) and "no_batch_dim" in case.desc):
                continue  # unbatched input: adanorm asks for the batch dimension explicitly
            native = module_info.module_cls(*case.constructor_input.args, **case.constructor_input.kwargs).to(dtype)
            adaptive = forced_twin(native).to(dtype)
            if native.affine:
                with torch.no_grad():
                    native.weight.uniform_(0.5, 1.5)
                    if native.bias is not None:
                        native.bias.uniform_(-0.5, 0.5)
                adaptive.load_state_dict({k: v for k, v in native.state_dict().items() if k in ("weight", "bias")}, strict=False)
            native.train(training)
            adaptive.train(training)
            tracks_instance_stats = isinstance(native, nn.modules.instancenorm._InstanceNorm) and native.track_running_stats
            if tracks_instance_stats and not training:
                continue  # native InstanceNorm with running stats in eval: adanorm's instance mode keeps per-sample stats
            for _ in range(2):
                torch.testing.assert_close(adaptive(x), native(x), atol=atol, rtol=rtol,
                                           msg=f"{module_info.module_cls.__name__} {case.desc}")
            if isinstance(native, nn.modules.batchnorm._BatchNorm) and native.track_running_stats and training:
                torch.testing.assert_close(adaptive.running_mean, native.running_mean, atol=atol, rtol=rtol)
                torch.testing.assert_close(adaptive.running_var, native.running_var, atol=atol, rtol=rtol)
