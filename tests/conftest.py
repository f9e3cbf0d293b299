import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run on one thread, restoring the caller's thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["native", "fused"])
def cpu_backend(request, monkeypatch):
    """Run a test twice: once on the native CPU kernels, once with the compiled fused kernels taking
    every input they can (size thresholds at zero), so small test shapes reach both paths."""
    from adanorm.functional import dispatch

    if request.param == "native":
        monkeypatch.setattr(dispatch, "cpu_kernels", lambda: None)
    else:
        assert dispatch.cpu_kernels() is not None, "the fused CPU kernels did not compile (see the warning)"
        for threshold in (name for name in dir(dispatch) if name.startswith("MIN_NUMEL_")):
            monkeypatch.setattr(dispatch, threshold, 0)
    return request.param
