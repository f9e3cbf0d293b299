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
    from adanorm.functional import cpu_fused

    if request.param == "native":
        monkeypatch.setattr(cpu_fused, "cpu_kernels", lambda: None)
    else:
        assert cpu_fused.cpu_kernels() is not None, "the fused CPU kernels did not compile (see the warning)"
        monkeypatch.setattr(cpu_fused, "MIN_NUMEL_BATCH", 0)
        monkeypatch.setattr(cpu_fused, "MIN_NUMEL_PER_SAMPLE_CHANNELS_LAST", 0)
        monkeypatch.setattr(cpu_fused, "MIN_NUMEL_PER_SAMPLE_CONTIGUOUS", 0)
        monkeypatch.setattr(cpu_fused, "MIN_NUMEL_PER_SAMPLE_FEW_GROUPS", 0)
    return request.param
