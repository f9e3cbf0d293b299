"""MONAI's own network tests, with adanorm's adaptive layer standing in for MONAI's batch and instance norm.

    python -m benchmarks.monai_network_tests PATH/TO/MONAI            # adaptive stands in (the check)
    python -m benchmarks.monai_network_tests PATH/TO/MONAI --native   # MONAI's own layers (the baseline)
    python -m benchmarks.monai_network_tests PATH/TO/MONAI -- -k unet # anything after -- goes to pytest

MONAI's wheel ships no tests, and nothing is downloaded here: PATH is a MONAI source checkout (only
its ``tests/`` folder is used; the installed ``monai`` package is the one tested). Get one with

    git clone https://github.com/Project-MONAI/MONAI && git -C MONAI checkout d388d1c6fec8

(a commit of MONAI's main branch whose tests the installed MONAI 1.6 passes natively on the selection
below), or with ``git archive <commit> tests | tar -x`` from a bare clone. The tests need the
``parameterized`` package. A run takes about a quarter of an hour on 2 cores; ``-- -k PATTERN`` narrows it.

While it runs, MONAI's norm factory builds ``norm="batch"`` and ``norm="instance"`` as
``adanorm.convert(<the native layer MONAI would have built>)``: an adaptive layer with the native
layer's semantics (BatchNorm statistics and running averages, InstanceNorm without running statistics
unless asked), so each MONAI test checks that the adaptive layer is a drop-in. ``instance_nvfuser``
(apex only) stays native. The selection is the test files of the networks and block whose norm
layers come from that factory: UNet, BasicUNet, DynUNet, SegResNet, ResNet and ADN.

It prints the totals and every failure with its reason, and exits 0 when the only failures are
``EXPECTED_FAILURES``: the ``test_script`` comparisons that check a TorchScript copy against the eager
network at ``atol=0``. A scripted network runs native kernels, the eager one adanorm's, and the two
differ in the last bits of float32, which ``atol=0`` with ``rtol=1e-4`` rejects on outputs near zero.
Each may pass or fail, depending on where those bits fall.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
from torch import nn

SELECTION = (
    "tests/networks/nets/test_unet.py",
    "tests/networks/nets/test_basic_unet.py",
    "tests/networks/nets/test_dynunet.py",
    "tests/networks/nets/test_segresnet.py",
    "tests/networks/nets/test_resnet.py",
    "tests/networks/blocks/test_adn.py",
)
EXPECTED_FAILURES = {
    # eager (adanorm kernels) against scripted (native kernels) at atol=0, rtol=1e-4
    "BasicUNet test_script": re.compile(r"tests/networks/nets/test_basic_unet\.py::\w+::test_script$"),
    "DynUNet test_script": re.compile(r"tests/networks/nets/test_dynunet\.py::\w+::test_script$"),
    "ResNet test_script": re.compile(r"tests/networks/nets/test_resnet\.py::\w+::test_script_\d+\w*$"),
}
NATIVE_BY_NAME: Dict[str, Dict[int, type]] = {
    "batch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "instance": {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
}
PYTEST_OPTIONS = ("-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning")


class AdaptiveStandIn:
    """A pytest plugin: from session start on, MONAI's ``batch`` and ``instance`` norms build adaptive layers.

    Counts the layers it builds, so a run in which the stand-in never reached a network shows up.
    """

    def __init__(self) -> None:
        self.built = 0

    def _stand_in(self, native_cls: type) -> Callable[..., nn.Module]:
        """A constructor with ``native_cls``'s signature (MONAI's factory reads it to pass ``num_features``)."""
        import adanorm

        def build(*args, **kwargs) -> nn.Module:
            self.built += 1
            return adanorm.convert(native_cls(*args, **kwargs))

        build.__signature__ = inspect.signature(native_cls)  # type: ignore[attr-defined]
        build.__name__ = build.__qualname__ = f"Adaptive{native_cls.__name__}"
        return build

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        from monai.networks.layers.factories import Norm

        for name, native_by_dim in NATIVE_BY_NAME.items():
            stand_ins = {dim: self._stand_in(cls) for dim, cls in native_by_dim.items()}
            Norm.add_factory_callable(name, stand_ins.__getitem__)


class ImportedHelpers:
    """A pytest plugin that deselects test functions a test module imported rather than defined.

    MONAI runs its tests with unittest; under pytest, helpers such as ``tests.test_utils.test_script_save``
    imported into a test module are collected as tests of their own and fail for want of fixtures.
    """

    def pytest_collection_modifyitems(self, config: pytest.Config, items: List[pytest.Item]) -> None:
        helpers = [item for item in items if isinstance(item, pytest.Function) and item.cls is None
                   and item.function.__module__ != item.module.__name__]
        if helpers:
            config.hook.pytest_deselected(items=helpers)
            items[:] = [item for item in items if item not in helpers]


class Outcomes:
    """A pytest plugin that records each test's outcome, and each failure's one-line reason."""

    def __init__(self) -> None:
        self.passed: List[str] = []
        self.skipped: List[str] = []
        self.failed: Dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.failed.setdefault(report.nodeid, _reason(report))
        elif report.skipped and report.when in ("setup", "call"):
            self.skipped.append(report.nodeid)
        elif report.passed and report.when == "call":
            self.passed.append(report.nodeid)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.failed[report.nodeid or "collection"] = _reason(report)


def _reason(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return " ".join(text.split())[:240]


def expected_name(nodeid: str) -> Optional[str]:
    """The ``EXPECTED_FAILURES`` entry a failing test id belongs to, or None."""
    return next((name for name, pattern in EXPECTED_FAILURES.items() if pattern.search(nodeid)), None)


def checkout_error(root: Path) -> Optional[str]:
    """Why ``root`` is not a MONAI checkout this script can run, or None."""
    missing = [path for path in SELECTION if not (root / path).is_file()]
    if not missing:
        return None
    return (f"{root} is not a MONAI source checkout: {missing[0]} is missing. Pass the folder that holds MONAI's "
            f"tests/, e.g. after `git clone https://github.com/Project-MONAI/MONAI`.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("monai_root", type=Path, help="a MONAI source checkout (the folder holding tests/)")
    parser.add_argument("--native", action="store_true", help="run with MONAI's own norm layers (the baseline)")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    root = args.monai_root.resolve()
    problem = checkout_error(root)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    # the installed monai, imported before pytest puts the checkout (and any monai/ source folder in it) on sys.path
    import monai

    print(f"monai {monai.__version__} from {Path(monai.__file__).parent}; tests from {root}; "
          f"{'native norms' if args.native else 'adaptive standing in for batch and instance'}", flush=True)
    outcomes = Outcomes()
    stand_in = AdaptiveStandIn()
    plugins = [ImportedHelpers(), outcomes] + ([] if args.native else [stand_in])
    start = time.perf_counter()
    exit_code = pytest.main([*PYTEST_OPTIONS, f"--rootdir={root}", *(str(root / path) for path in SELECTION), *extra],
                            plugins=plugins)
    return report(outcomes, exit_code, time.perf_counter() - start, None if args.native else stand_in.built)


def report(outcomes: Outcomes, exit_code: int, seconds: float, adaptive_built: Optional[int]) -> int:
    """Print the totals and failures; 0 when every failure is expected (and adaptive layers were built)."""
    ran = len(outcomes.passed) + len(outcomes.failed)
    print(f"\n{len(outcomes.passed)} passed, {len(outcomes.failed)} failed, {len(outcomes.skipped)} skipped "
          f"in {seconds:.0f} s: {len(outcomes.passed)}/{ran} of the tests that ran pass")
    unexpected = {nodeid: reason for nodeid, reason in outcomes.failed.items() if expected_name(nodeid) is None}
    for nodeid, reason in sorted(outcomes.failed.items()):
        label = f"expected ({expected_name(nodeid)})" if nodeid not in unexpected else "UNEXPECTED"
        print(f"  {label}: {nodeid}\n      {reason}")
    if adaptive_built is not None:
        print(f"adaptive layers built in MONAI's factory: {adaptive_built}")
        if adaptive_built == 0:
            print("the stand-in never reached a network: the run checks nothing", file=sys.stderr)
            return 1
    if exit_code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or not outcomes.passed:
        print(f"pytest ended with {pytest.ExitCode(exit_code).name}", file=sys.stderr)
        return 1
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
