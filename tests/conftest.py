import os

import pytest
import torch

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

# pytest-xdist workers share the cores: each takes its share of torch's threads (it would otherwise take them all,
# and OpenMP threads outnumbering cores wait on each other).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.hookimpl(optionalhook=True)  # pytest without xdist (`-p no:xdist`) knows no such hook
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4, since each worker holds 1–2 GB."""
    return min(CORES, 4)


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
