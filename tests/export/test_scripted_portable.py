"""A scripted network is a deployable artifact: saved with torch.jit.save, it loads and runs, in training
and in eval, in a process that never imports adanorm (as LibTorch or an inference server would run it),
and computes what the eager network computes within float32's own error.

The bound: the scripted network runs PyTorch's native norm kernels, the eager one adanorm's, so they
round differently, and neither is the reference. The same eager network in float64 is (its rounding error
is some 2^29 times smaller), and the eager float32 network's distance to it, max|eager32 - eager64|, is
float32's own error on this input. The scripted network is held to the same error: by the triangle
inequality max|scripted - eager32| <= err(scripted) + err(eager32), and it may round up to three times
worse than eager before the check fails: max|scripted - eager32| <= 4 max|eager32 - eager64|, plus one
float32 ulp of the output's scale for an error that happens to round to zero."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet, resnet18

import adanorm

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::adanorm.FallbackWarning")]

NETWORKS = {
    "UNet": lambda: UNet(3, 1, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), norm="adaptive"),
    "BasicUNet": lambda: BasicUNet(3, 1, 2, features=(8, 8, 16, 16, 32, 8), norm="adaptive"),
    "DynUNet": lambda: DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                               norm_name="adaptive"),
    "SegResNet": lambda: SegResNet(3, init_filters=8, in_channels=1, out_channels=2, norm="adaptive"),
    "ResNet": lambda: adanorm.convert(resnet18(spatial_dims=3, n_input_channels=1, num_classes=2)),
}
# Per-sample statistics (batch 2), batch statistics that teach the running statistics (batch 32), and eval
# at batch 1 with those running statistics: every path of the scripted layer.
STEPS = (("train", 2), ("train", 32), ("eval", 1))

RUN_WITHOUT_ADANORM = textwrap.dedent("""
    import sys
    import torch


    class RefuseAdanorm:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "adanorm":
                raise ImportError("a scripted network must run without adanorm, but it imported " + name)
            return None


    sys.meta_path.insert(0, RefuseAdanorm())
    folder = sys.argv[1]
    inputs = torch.load(folder + "/inputs.pt")
    outputs = {}
    for name in sys.argv[2:]:
        model = torch.jit.load(folder + "/" + name + ".pt")
        results = []
        for phase, x in inputs:
            model.train(phase == "train")
            results.append(model(x))
        outputs[name] = results
    assert "adanorm" not in sys.modules
    torch.save(outputs, folder + "/outputs.pt")
""")


def run_eager(model, inputs):
    results = []
    for phase, x in inputs:
        model.train(phase == "train")
        results.append(model(x).detach())
    return results


def test_scripted_monai_networks_run_without_adanorm_within_float32_error(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs = [(phase, torch.randn(batch, 1, 16, 16, 16, generator=generator) * 2 + 1) for phase, batch in STEPS]
    torch.save(inputs, tmp_path / "inputs.pt")
    eager = {}
    for name, build in NETWORKS.items():
        torch.manual_seed(0)
        eager[name] = build()
        torch.jit.save(torch.jit.script(copy.deepcopy(eager[name])), tmp_path / f"{name}.pt")
    completed = subprocess.run([sys.executable, "-c", RUN_WITHOUT_ADANORM, str(tmp_path), *NETWORKS],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    scripted = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        for name, model in eager.items():
            float64 = run_eager(copy.deepcopy(model).double(), [(phase, x.double()) for phase, x in inputs])
            float32 = run_eager(model, inputs)
            for (phase, x), ran, eager32, eager64 in zip(inputs, scripted[name], float32, float64):
                float32_error = (eager32.double() - eager64).abs().max()
                tiny = torch.finfo(torch.float32).eps * eager64.abs().max()
                difference = (ran.double() - eager32.double()).abs().max()
                assert difference <= 4 * float32_error + tiny, (
                    f"{name}, {phase} at batch {x.shape[0]}: scripted differs from eager by {difference:.3g}, "
                    f"float32's own error is {float32_error:.3g}")
