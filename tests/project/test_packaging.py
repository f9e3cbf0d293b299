"""The newcomer's path (#15): what pyproject.toml promises, a cheap ``import adanorm``, MONAI registration in either
import order, and a built wheel whose ``adanorm-train`` / ``adanorm-predict`` work from any directory."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from recipe_runs import REPO, one_epoch, tiny

pytestmark = pytest.mark.slow  # recipe runs, subprocesses or builds: the full suite's part

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

RECIPE_MODULES = ("monai", "lightning", "hydra", "omegaconf", "matplotlib", "nibabel", "scipy", "triton")
UNET = ("from monai.networks.nets import UNet; "
        "net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), norm='adaptive'); "
        "print(type(net.model[0].adn.N).__name__)")


def python(code, cwd=None, env=None, timeout=120):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                            cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def pyproject():
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]


def names(requirements):
    return {re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_the_layer_depends_on_torch_only_and_the_recipes_are_an_extra():
    project = pyproject()
    assert names(project["dependencies"]) == {"torch", "ninja"}  # ninja builds the CPU kernels on first use
    torch_requirement, = [r for r in project["dependencies"] if r.startswith("torch")]
    assert "<" in torch_requirement, "an unbounded torch pulls a multi-GB CUDA build"
    extras = project["optional-dependencies"]
    assert names(extras["recipes"]) == {"monai", "lightning", "hydra-core", "nibabel", "matplotlib", "tqdm",
                                         "av", "scikit-learn"}
    assert "triton" not in names(extras["test"]), "CPU-only installs must not download triton"
    assert names(extras["triton"]) == {"triton"}
    assert project["scripts"] == {"adanorm-train": "adanorm.recipes.cli:train_main",
                                  "adanorm-predict": "adanorm.recipes.cli:predict_main"}


def _release(version):
    return tuple(int(part) for part in version.split(".")[:2])


def test_the_torch_bound_admits_the_releases_the_whole_suite_ran_on():
    """``torch>=LOW,<HIGH``: LOW is the oldest release docs/reliability.md lists a whole-suite run of
    (``.ci/torch_matrix``), and HIGH the minor release after the newest it lists."""
    torch_requirement, = [r for r in pyproject()["dependencies"] if r.startswith("torch")]
    low, high = re.fullmatch(r"torch>=([\d.]+),<([\d.]+)", torch_requirement).groups()
    page = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    section = page.split("\n## Torch versions\n", 1)[1].split("\n## ", 1)[0]
    tested = sorted(_release(version) for version in re.findall(r"^\| (\d+\.\d+\.\d+)\S* \|", section, re.M))
    assert tested, "docs/reliability.md's torch-versions table lists no run"
    assert _release(low) == tested[0], f"torch>={low}, but the oldest release with a whole-suite run is {tested[0]}"
    newest = tested[-1]
    assert _release(high) == (newest[0], newest[1] + 1), f"torch<{high}, but the newest release run is {newest}"


def test_import_adanorm_imports_no_recipe_dependency():
    """The layer is torch only: MONAI alone costs more than torch to import (scipy, matplotlib, nibabel)."""
    loaded = python(f"import sys, adanorm; print(sorted(m for m in {RECIPE_MODULES!r} if m in sys.modules))")
    assert loaded.strip() == "[]"


def test_monai_first_then_adanorm_registers_adaptive():
    assert python(f"import monai; import adanorm; {UNET}").strip() == "AdaptiveNorm3d"


def test_adanorm_first_registers_once_monais_factory_module_is_imported():
    out = python(
        "import sys, inspect, adanorm\n"
        "assert 'monai' not in sys.modules\n"
        "import monai\n"
        "from monai.networks.layers import factories\n"
        "assert factories.Norm['adaptive', 2] is adanorm.AdaptiveNorm2d\n"
        "assert 'class LayerFactory' in inspect.getsource(factories), 'its loader still serves its source'\n"
        "assert not [f for f in sys.meta_path if type(f).__module__ == 'adanorm.integrations.monai'], 'one shot'\n"
        f"{UNET}")
    assert out.strip() == "AdaptiveNorm3d"


def test_triton_tests_skip_with_a_reason_without_triton(tmp_path):
    (tmp_path / "triton.py").write_text("raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             str(REPO / "tests" / "functional" / "test_triton.py")], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=300)
    assert result.returncode in (0, 5), result.stdout[-3000:]  # 5: the module skipped, so nothing was collected
    assert re.search(r"SKIPPED.*test_triton\.py.*triton", result.stdout), result.stdout[-3000:]


def _wheel(tmp_path):
    """``pip wheel`` of a copy of the package sources (the checkout stays free of build/ and egg-info)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("adanorm", "configs"):  # configs/ installs as adanorm.configs (pyproject.toml's package-dir)
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path / "dist")]
    if _setuptools_builds_wheels():
        command.append("--no-build-isolation")  # nothing is downloaded
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("adanorm-*.whl")
    return wheel


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _setuptools_builds_wheels():
    """This environment's setuptools builds a wheel by itself: from 70.1 it has ``bdist_wheel``, before that
    it needs the ``wheel`` package. A fresh venv of Python 3.11 holds setuptools 65 without ``wheel``, and
    torch 2.12 keeps it there (later torch requires setuptools 77 or later); pip's build isolation then
    installs a current setuptools."""
    if not _has("setuptools"):
        return False
    from importlib.metadata import version

    return tuple(int(part) for part in re.findall(r"\d+", version("setuptools"))[:2]) >= (70, 1) or _has("wheel")


@pytest.mark.slow
def test_wheel_entry_points_work_from_any_directory(tmp_path):
    """A plain (not editable) install: configs packaged, both commands on PATH, Hydra's run folder in the cwd."""
    wheel = _wheel(tmp_path)
    files = set(zipfile.ZipFile(wheel).namelist())
    from adanorm.functional import cpu_build

    sources = {f"adanorm/csrc/{path.name}" for path in cpu_build.SOURCES}
    assert {"adanorm/configs/train.yaml", "adanorm/configs/model/dynunet.yaml", "adanorm/configs/task/segmentation.yaml",
            "adanorm/csrc/norm_cpu_kernels.h", "adanorm/csrc/vector_math.h"} | sources <= files

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    venv_python = next(bin_dir.glob("python*"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv_python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    # torch, MONAI, Lightning, Hydra from this environment, after the venv's own site-packages (which holds
    # the wheel); a .pth line, unlike PYTHONPATH, never shadows the installed adanorm with this checkout's.
    site_packages = Path(subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        check=True, capture_output=True, text=True).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "borrowed.pth").write_text("\n".join(sorted(ours)) + "\n")

    work = tmp_path / "elsewhere"  # outside the checkout
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]), OMP_NUM_THREADS="1",
               ADANORM_CPU_KERNEL="0")  # the compiled kernels would rebuild for this source path (a minute)

    def run(*command):
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result.stdout + result.stderr

    where = run(str(venv_python), "-c", "import adanorm; print(adanorm.__file__)")
    assert where.strip().startswith(str(site_packages)), "the wheel's adanorm, not the checkout's"
    help_text = run("adanorm-train", "--help")
    models = ", ".join(sorted(path.stem for path in (REPO / "configs" / "model").glob("*.yaml")))
    assert f"model: {models}" in help_text, help_text[-2000:]  # every model config shipped in the wheel
    assert "usage:" in run("adanorm-predict", "--help")

    output = run("adanorm-train", *tiny(tmp_path / "data"), *one_epoch())
    assert "best val/dice" in output
    run_dir, = (work / "outputs").glob("*/*")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_dir.parent.name) and re.fullmatch(r"\d{2}-\d{2}-\d{2}", run_dir.name)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "curves.png").is_file()
    assert (run_dir / "train.log").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]
