"""``benchmarks.monai_network_tests``: its stand-in builds adaptive layers that compute what MONAI's native
layers compute, only the atol=0 script comparisons count as expected failures, and a wrong path ends in
one message. The MONAI test run itself takes minutes and needs a MONAI checkout: it is run by hand."""
import pytest
import torch
from torch import nn

from benchmarks import monai_network_tests as script

pytest.importorskip("monai")
from monai.networks.layers import get_norm_layer  # noqa: E402
from monai.networks.layers.factories import Norm  # noqa: E402


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in registered in MONAI's factory for one test; MONAI's own entries come back afterwards."""
    for name in script.NATIVE_BY_NAME:
        monkeypatch.setitem(Norm.components, name.upper(), Norm.components[name.upper()])
    monkeypatch.setattr(Norm, "__doc__", Norm.__doc__)
    plugin = script.AdaptiveStandIn()
    plugin.pytest_sessionstart(None)
    return plugin


@pytest.mark.parametrize("norm, native_cls", [
    ("batch", nn.BatchNorm3d), ("instance", nn.InstanceNorm3d), (("instance", {"affine": True}), nn.InstanceNorm3d),
])
def test_stand_in_computes_what_the_native_layer_computes(stand_in, norm, native_cls):
    adaptive = get_norm_layer(norm, spatial_dims=3, channels=4)
    native = native_cls(4, **({} if isinstance(norm, str) else norm[1]))
    assert type(adaptive).__name__ == "AdaptiveNorm3d" and stand_in.built == 1
    assert adaptive.state_dict().keys() == native.state_dict().keys()
    x = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
    adaptive.double(), native.double()
    for _ in range(2):  # train steps move BatchNorm's running statistics, which eval then reads
        torch.testing.assert_close(adaptive(x), native(x))
    adaptive.eval(), native.eval()
    torch.testing.assert_close(adaptive(x + 1), native(x + 1))


def test_without_the_stand_in_monai_builds_its_native_layers():
    assert type(get_norm_layer("batch", spatial_dims=3, channels=4)) is nn.BatchNorm3d


@pytest.mark.parametrize("nodeid, expected", [
    ("tests/networks/nets/test_basic_unet.py::TestBasicUNET::test_script", "BasicUNet test_script"),
    ("tests/networks/nets/test_dynunet.py::TestDynUNet::test_script", "DynUNet test_script"),
    ("tests/networks/nets/test_resnet.py::TestResNet::test_script_0", "ResNet test_script"),
    ("tests/networks/nets/test_unet.py::TestUNET::test_script", None),
    ("tests/networks/nets/test_unet.py::TestUNET::test_script_without_running_stats", None),
    ("tests/networks/nets/test_basic_unet.py::TestBasicUNET::test_shape_0", None),
    ("tests/networks/blocks/test_adn.py::TestADN3D::test_adn_3d_5", None),
])
def test_only_the_atol0_script_comparisons_are_expected_failures(nodeid, expected):
    assert script.expected_name(nodeid) == expected


def _outcomes(*failed: str) -> script.Outcomes:
    outcomes = script.Outcomes()
    outcomes.passed.append("tests/networks/nets/test_unet.py::TestUNET::test_shape_0")
    outcomes.failed.update({nodeid: "AssertionError" for nodeid in failed})
    return outcomes


@pytest.mark.parametrize("failed, built, code", [
    (("tests/networks/nets/test_dynunet.py::TestDynUNet::test_script",), 10, 0),
    (("tests/networks/blocks/test_adn.py::TestADN3D::test_adn_3d_5",), 10, 1),
    ((), 0, 1),  # nothing adaptive was built: the run checked nothing
    ((), None, 0),  # the native baseline
])
def test_exit_code_is_zero_only_when_every_failure_is_expected(capsys, failed, built, code):
    exit_code = pytest.ExitCode.TESTS_FAILED if failed else pytest.ExitCode.OK
    assert script.report(_outcomes(*failed), exit_code, 1.0, built) == code
    out = capsys.readouterr().out
    assert f"1 passed, {len(failed)} failed" in out
    assert all(nodeid in out for nodeid in failed)


def test_a_folder_without_monai_tests_is_one_message(tmp_path, capsys):
    assert script.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a MONAI source checkout" in err and "tests/networks/nets/test_unet.py" in err
    assert "Traceback" not in err
