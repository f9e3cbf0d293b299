"""Bad input gets an error that names the problem and the fix."""
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import InterpolationResolutionError

import adanorm
from adanorm.recipes import cli
from adanorm.recipes.checkpoint import CheckpointError
from adanorm.recipes.cli import predict_main, predict_parser
from adanorm.recipes.errors import ReportedError, describe, exit_on_user_error, user_error
from adanorm.recipes.layouts import VolumeDataError
from adanorm.recipes.sweep import best_epoch

pytestmark = pytest.mark.slow  # recipe runs, subprocesses or builds: the full suite's part


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"eps": -1e-5}, ValueError, "eps=-1e-05 is invalid.*non-negative"),
        ({"eps": float("nan")}, ValueError, "eps=nan"),
        ({"momentum": 1.5}, ValueError, r"momentum=1.5 is invalid.*\[0, 1\]"),
        ({"momentum": -0.1}, ValueError, "momentum=-0.1"),
        ({"num_groups": 3}, ValueError, "num_groups=3 does not divide num_features=8.*choose one of"),
        ({"num_groups": 0}, ValueError, "num_groups=0 is invalid"),
        ({"preset": "fast"}, ValueError, "preset='fast' is unknown; choose one of"),
        ({"preset": "small_batch", "momentum": 0.3}, ValueError, "conflicts with preset"),
        ({"mode": "batchnorm"}, ValueError, "mode='batchnorm' is unknown; choose one of"),
        ({"policy": {"min_batch_size": 2}}, TypeError, "adanorm.Policy"),
    ],
)
def test_invalid_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        adanorm.AdaptiveNorm3d(8, **kwargs)


def test_invalid_num_features():
    with pytest.raises(ValueError, match="num_features=0 is invalid"):
        adanorm.AdaptiveNorm3d(0)


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"expected 8 channels.*\(2, 4, 3, 3, 3\).*previous layer"):
        adanorm.AdaptiveNorm3d(8)(torch.randn(2, 4, 3, 3, 3))


@pytest.mark.parametrize(
    "cls,shape",
    [(adanorm.AdaptiveNorm3d, (2, 8, 3, 3)), (adanorm.AdaptiveNorm2d, (2, 8, 3, 3, 3)), (adanorm.AdaptiveNorm1d, (2, 8, 3, 3))],
)
def test_wrong_number_of_dimensions(cls, shape):
    with pytest.raises(ValueError, match=f"expects .* input, got {len(shape)}-D input"):
        cls(8)(torch.randn(shape))


def test_unbatched_input_names_the_fix():
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        adanorm.AdaptiveNorm3d(8)(torch.randn(8, 3, 3, 3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_input(dtype):
    with pytest.raises(TypeError, match=r"needs floating point.*\.float\(\)"):
        adanorm.AdaptiveNorm3d(2)(torch.ones(2, 2, 2, 2, 2, dtype=dtype))


def test_forced_mode_on_unsupported_shape():
    with pytest.raises(ValueError, match=r"mode='instance'.*\(2, 8, 1, 1, 1\).*single value.*mode='auto'"):
        adanorm.AdaptiveNorm3d(8, mode="instance")(torch.randn(2, 8, 1, 1, 1))


@pytest.mark.parametrize(
    "mode,shape", [("batch", (1, 8, 1, 1, 1)), ("instance", (2, 8, 1, 1, 1)), ("group", (2, 4, 1, 1)), ("layer", (3, 1, 1))]
)
def test_functional_core_refuses_single_value_statistics(mode, shape):
    """The core calls the aten kernels directly, so it must still raise where F.batch_norm/F.group_norm
    would, instead of returning β for every value."""
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    with pytest.raises(ValueError, match=r"single value.*mode='auto'"):
        adanorm.functional.adaptive_norm(torch.randn(shape), mode, weight, bias, training=True, num_groups=4)
    empty = torch.randn((0,) + shape[1:])
    assert adanorm.functional.adaptive_norm(empty, mode, weight, bias, training=True, num_groups=4).shape == empty.shape


@pytest.mark.parametrize("input_dtype, parameter_dtype", [
    (torch.float32, torch.float64), (torch.float64, torch.float32),
    (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
])
def test_dtypes_native_norms_reject_get_an_error_that_names_them(input_dtype, parameter_dtype):
    with pytest.raises(RuntimeError):  # what the native layer does with these dtypes
        torch.nn.BatchNorm3d(4, dtype=parameter_dtype)(torch.randn(2, 4, 2, 2, 2, dtype=input_dtype))
    layer = adanorm.AdaptiveNorm3d(4, dtype=parameter_dtype)
    for mode_layer in (layer, adanorm.AdaptiveNorm3d(4, mode="identity", dtype=parameter_dtype)):
        with pytest.raises(TypeError, match=rf"input is {input_dtype} but the layer's parameters are "
                                            rf"{parameter_dtype}.*autocast"):
            mode_layer(torch.randn(2, 4, 2, 2, 2, dtype=input_dtype))


# The commands: a user's mistake ends adanorm-train and adanorm-predict with one short message, not a traceback.

ADANORM_TRAIN = Path(sys.executable).with_name("adanorm-train")  # the console script of this environment


def adanorm_train(cwd, *overrides, **environment):
    return subprocess.run([str(ADANORM_TRAIN), *overrides], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **environment})


def the_run_folder(cwd):
    (run,) = (cwd / "outputs").glob("*/*")
    return run


def assert_short_error(result, *phrases):
    """The command failed with a report of at most 5 lines (from Hydra's "Error executing job" line, where a
    job ran: the progress printed before it is no part of it), holding one error line with ``phrases``."""
    assert result.returncode == 1, result.stderr[-3000:]
    report = result.stderr[result.stderr.find("Error executing job"):] if "Error executing job" in result.stderr \
        else result.stderr
    assert "Traceback" not in result.stderr and len(report.strip().splitlines()) <= 5, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("adanorm-train: error: ")]
    assert all(phrase in line for phrase in phrases), line
    return line


def test_invalid_preset_is_one_message_written_to_the_runs_log_too(tmp_path):
    result = adanorm_train(tmp_path, "norm=instance", "norm.preset=small_batch")
    line = assert_short_error(result, "norm=instance keeps no running statistics", "norm.preset=small_batch",
                              "drop norm.preset")
    run = the_run_folder(tmp_path)
    assert sorted(path.name for path in run.iterdir()) == [".hydra", "train.log"]
    assert (run / "train.log").read_text().strip().splitlines()[-1].endswith(f"[ERROR] - {line}")


def test_a_run_that_fails_before_its_first_step_keeps_only_its_config_and_the_error(tmp_path):
    for case in "abc":  # labels holding class 2 while data.num_classes is 2: the label check stops the run
        image = np.random.RandomState(0).rand(8, 8, 8).astype(np.float32)
        for folder, volume in (("imagesTr", image), ("labelsTr", (image > 0.5).astype(np.uint8) * 2)):
            (tmp_path / "scans" / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "scans" / folder / f"{case}.nii.gz")
    result = adanorm_train(tmp_path, "data=nifti_folder", "data.root=scans", "data.patch_size=[8,8,8]",
                           "data.label_cache=null")
    line = assert_short_error(result, "labelsTr/", "data.num_classes")
    run = the_run_folder(tmp_path)
    assert sorted(path.name for path in run.iterdir()) == [".hydra", "train.log"], "no logger or checkpoint folders"
    assert (run / "train.log").read_text().strip().splitlines()[-1].endswith(f"[ERROR] - {line}")


def test_missing_checkpoint_is_one_line_and_starts_no_run(tmp_path):
    assert_short_error(adanorm_train(tmp_path, "ckpt_path=missing.ckpt", "trainer.max_epochs=3"),
                       "ckpt_path=missing.ckpt is not a file", "ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt")
    assert not (tmp_path / "outputs").exists()


def test_adanorm_train_help_says_how_to_see_the_traceback(tmp_path):
    result = subprocess.run([str(ADANORM_TRAIN), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "verbose=true or HYDRA_FULL_ERROR=1 shows the traceback" in result.stdout


@pytest.mark.parametrize("content, phrase", [
    (None, "missing.ckpt: no such file or directory; check the path"),
    (b"PK\x03\x04 cut short", "cannot be read as a PyTorch checkpoint"),
])
def test_bad_checkpoint_ends_adanorm_predict_with_one_line(content, phrase, tmp_path, capsys):
    checkpoint = tmp_path / "missing.ckpt"
    if content is not None:
        checkpoint.write_bytes(content)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "scan.nii.gz")
    arguments = [str(checkpoint), str(tmp_path / "scan.nii.gz"), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        predict_main(arguments, prog="adanorm-predict")
    assert stop.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"adanorm-predict: error: {tmp_path}") and phrase in line
    with pytest.raises((FileNotFoundError, CheckpointError)):  # --verbose: the exception itself, with its traceback
        predict_main([*arguments, "--verbose"], prog="adanorm-predict")
    assert "--verbose" in predict_parser().format_help()


def refuse_the_data(path):
    raise VolumeDataError(f"{path} holds no labels; add labelsTr/.")


def read_the_data(path):
    return open(path).read()


def fail_with_a_bug(path):
    raise RuntimeError("an internal error")


@pytest.mark.parametrize("target, message", [
    (refuse_the_data, "{path} holds no labels; add labelsTr/."),
    (read_the_data, "{path}: no such file or directory; check the path, and that the file is readable."),
    (fail_with_a_bug, None),
])
def test_user_errors_are_told_from_bugs_through_the_wrapper_instantiate_puts_around_them(target, message, tmp_path):
    with pytest.raises(InstantiationException) as wrapped:  # how a data module's or model's error reaches the run
        instantiate({"_target_": f"{__name__}.{target.__name__}", "path": str(tmp_path / "scans")})
    cause = user_error(wrapped.value)
    assert (cause is None) if message is None else describe(cause) == message.format(path=tmp_path / "scans")
    with pytest.raises(SystemExit if message else InstantiationException), exit_on_user_error("adanorm-predict"):
        raise wrapped.value


def test_the_task_function_turns_a_user_error_into_one_line_unless_verbose(tmp_path):
    overrides = ["norm=instance", "norm.preset=small_batch", f"output_dir={tmp_path}"]
    with initialize_config_module(config_module="adanorm.configs", version_base="1.3"):
        quiet, verbose = compose("train", overrides=overrides), compose("train", overrides=[*overrides, "verbose=true"])
    with pytest.raises(ReportedError) as reported:
        cli._train(quiet)
    assert str(reported.value).startswith("adanorm-train: error: norm=instance keeps no running statistics")
    assert "\n" not in str(reported.value)
    with pytest.raises(InterpolationResolutionError):
        cli._train(verbose)


def test_a_value_error_adanorm_raises_is_a_refusal_and_one_python_raises_in_adanorm_is_a_bug(tmp_path):
    with pytest.raises(ValueError) as refusal:
        adanorm.AdaptiveNorm3d(8, num_groups=3)
    assert user_error(refusal.value) is refusal.value
    (tmp_path / "metrics.csv").write_text("epoch,val/dice\n0,not a number\n")
    with pytest.raises(ValueError) as bug:  # float() of a corrupt metrics.csv, inside adanorm.recipes.sweep
        best_epoch(tmp_path / "metrics.csv", "val/dice")
    assert user_error(bug.value) is None
