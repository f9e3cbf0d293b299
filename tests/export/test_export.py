"""Export: ONNX (legacy tracing exporter and the dynamo exporter; static and dynamic batch; both
layouts) run by onnxruntime, torch.export with a dynamic batch, and MONAI's own export utilities."""
import warnings

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from monai.networks.utils import convert_to_onnx, convert_to_torchscript
from torch import nn

import adanorm

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install -e '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install -e '.[test]')")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::adanorm.FallbackWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def conv_norm(learned):
    model = nn.Sequential(nn.Conv3d(2, 16, 3, padding=1), adanorm.AdaptiveNorm3d(16), nn.ReLU())
    if learned:  # batch-mode training: eval then uses the running statistics
        model(torch.randn(32, 2, 6, 6, 6) * 2 + 1)
        assert model[1].has_learned_running_stats()
    return model.eval()


def unet(learned):
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), norm="adaptive")
    if learned:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.randn(32, 1, 16, 16, 16))  # batch mode: learned running statistics
        assert all(m.has_learned_running_stats() for m in model.modules() if isinstance(m, adanorm.AdaptiveNorm))
    return model.eval()


def layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


def export_and_run(model, example, path, dynamo, dynamic_batch):
    options = {}
    if dynamic_batch and dynamo:
        options["dynamic_shapes"] = ({0: torch.export.Dim("batch", max=64)},)
    elif dynamic_batch:
        options["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, input_names=["x"], output_names=["y"], dynamo=dynamo, **options)
    graph = onnx.load(str(path)).graph
    assert len(graph.input) == 1, "the exported graph has no input: it would return a constant"
    session = ort.InferenceSession(str(path))
    return lambda x: session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static_batch", "dynamic_batch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("learned", [False, True], ids=["per_sample", "running_stats"])
@pytest.mark.parametrize("build, size, channels", [(conv_norm, 6, 2), (unet, 16, 1)], ids=["conv_norm", "unet"])
def test_onnx_export_runs_in_onnxruntime_like_pytorch(tmp_path, build, size, channels, learned, channels_last, dynamic_batch, dynamo):
    model = build(learned)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    example = layout(torch.randn(2, channels, size, size, size), channels_last)
    run = export_and_run(model, example, tmp_path / "model.onnx", dynamo, dynamic_batch)
    for batch in ([1, 3] if dynamic_batch else [2]):
        x = layout(torch.randn(batch, channels, size, size, size) * 2 - 1, channels_last)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(run(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("learned", [False, True], ids=["per_sample", "running_stats"])
def test_torch_export_with_a_dynamic_batch(learned):
    model = conv_norm(learned)
    batch = torch.export.Dim("batch", max=64)
    exported = torch.export.export(model, (torch.randn(2, 2, 6, 6, 6),), dynamic_shapes=({0: batch},))
    for size in (1, 5):
        x = torch.randn(size, 2, 6, 6, 6)
        torch.testing.assert_close(exported.module()(x), model(x))


def test_monai_export_utilities_verify_a_unet_with_adaptive_norm(tmp_path):
    model = unet(learned=False)
    convert_to_torchscript(model, filename_or_obj=str(tmp_path / "unet.ts"), verify=True, inputs=[torch.randn(1, 1, 16, 16, 16)],
                           rtol=1e-4, atol=1e-4)
    convert_to_onnx(model, inputs=[torch.randn(1, 1, 16, 16, 16)], input_names=["x"], output_names=["y"], verify=True,
                    filename=str(tmp_path / "unet.onnx"), rtol=1e-4, atol=1e-4)
