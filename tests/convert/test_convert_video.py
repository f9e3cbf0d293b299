"""A converted BatchNorm video network equals the native one wherever native BatchNorm runs (batch 1 included),
and falls back, with one warning, only where native raises.

Compared in float64: the two networks run the same arithmetic, but in float32 five steps of batch-1 training
amplify the kernels' different rounding (each about as far from a float64 reference as the other) past any
tolerance that would still catch a wrong running-statistics update.
"""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import adanorm
from adanorm.recipes.models import r2plus1d_resnet

pytestmark = pytest.mark.slow  # recipe runs, subprocesses or builds: the full suite's part

CLIP = (3, 8, 32, 32)  # channels, frames, height, width
STEPS = 5


def fine_tune(model, clips, labels):
    """SGD with momentum, one batch of clips per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for clip, label in zip(clips, labels):
        loss = nn.functional.cross_entropy(model(clip), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def batch_norms(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.BatchNorm3d)}


@pytest.mark.parametrize("batch", [1, 2])
def test_converted_network_fine_tunes_at_small_batch_exactly_as_native_and_reverts(batch):
    native = r2plus1d_resnet().double()
    converted = adanorm.convert(copy.deepcopy(native))
    clips = torch.randn(STEPS, batch, *CLIP, dtype=torch.float64)
    labels = torch.randint(0, 4, (STEPS, batch))
    fine_tune(native, clips, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fine_tune(converted, clips, labels)
    assert [str(w.message) for w in caught] == []

    native_norms = batch_norms(native)
    converted_norms = dict(converted.named_modules())
    assert len(native_norms) == 21  # stem 2, first stage 4, three strided stages 5 each
    for name, layer in native_norms.items():
        assert layer.running_mean.abs().max() > 1e-3, f"{name}: the running statistics must move for the test to mean anything"
        adaptive = converted_norms[name]
        assert isinstance(adaptive, adanorm.AdaptiveNorm3d) and adaptive.mode_counts["batch"] == STEPS, name
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(adaptive, buffer), getattr(layer, buffer), msg=f"{name}.{buffer}")
    converted_state = converted.state_dict()
    for key, value in native.state_dict().items():
        torch.testing.assert_close(converted_state[key], value, msg=key)

    native.eval(), converted.eval()
    for batch in (1, 2):
        clip = torch.randn(batch, *CLIP, dtype=torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = converted(clip)
        assert [str(w.message) for w in caught] == []
        torch.testing.assert_close(output, native(clip))

    # The round trip: revert gives BatchNorm3d layers holding the fine-tuned state, equal to native's.
    reverted = adanorm.revert(converted)
    assert batch_norms(reverted).keys() == native_norms.keys()
    assert not any(isinstance(module, adanorm.AdaptiveNorm) for module in reverted.modules())
    for key, value in native.state_dict().items():
        torch.testing.assert_close(reverted.state_dict()[key], value, msg=key)
    clip = torch.randn(2, *CLIP, dtype=torch.float64)
    torch.testing.assert_close(reverted.eval()(clip), native(clip))


def test_converted_network_falls_back_only_where_native_raises():
    """On 8×16×16 clips the last stage is 1×1×1: at batch 1 native BatchNorm3d sees one value per channel there
    and raises. The converted network falls back in exactly those layers, with one warning for the model."""
    native = r2plus1d_resnet().double()
    converted = adanorm.convert(copy.deepcopy(native))
    clip = torch.randn(1, 3, 8, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        native(clip)

    shapes = {}
    for name, layer in converted.named_modules():
        if isinstance(layer, adanorm.AdaptiveNorm):
            layer.register_forward_hook(lambda module, inputs, output, name=name: shapes.__setitem__(name, inputs[0].shape))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted(clip)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and issubclass(caught[0].category, adanorm.FallbackWarning), messages
    assert "fell back to 'group' mode from 'batch'" in messages[0] and "(Sequential.4." in messages[0]
    single_value = {name for name, shape in shapes.items() if shape[0] * math.prod(shape[2:]) == 1}
    assert single_value and all(name.startswith("4.") for name in single_value)
    for name, layer in converted.named_modules():
        if isinstance(layer, adanorm.AdaptiveNorm):
            expected = ("group", "batch") if name in single_value else ("batch", None)
            assert (layer.last_mode, layer.last_fallback_from) == expected, name

    # Two clips give two values per channel there: native runs, and so does batch mode, without a warning.
    native.train(), converted.train()
    clips = torch.randn(2, 3, 8, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = converted(clips)
    assert [str(w.message) for w in caught] == []
    torch.testing.assert_close(output, native(clips))
    # In eval the running statistics serve every shape, as natively.
    native.eval(), converted.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = converted(clip)
    assert [str(w.message) for w in caught] == []
    torch.testing.assert_close(output, native(clip))
