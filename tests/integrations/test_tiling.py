"""Tile-consistent statistics (adanorm.tiling): per-tile, running and whole-volume statistics in
sliding-window inference, the context manager's restoration, the tile report, and predict's options."""
import csv
import importlib.util
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.networks.nets import BasicUNet, DynUNet, UNet
from recipe_runs import REPO, trained_checkpoint, write_scan
from torch import nn

import adanorm
from adanorm.recipes.module import SegmentationModule
from adanorm.tiling import downsampling_factors, norm_statistics, tile_report, whole_volume_prediction, window_starts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

spec = importlib.util.spec_from_file_location("predict_script", REPO / "predict.py")
predict_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(predict_script)


def drifting_volume(shape=(64, 32, 32)):
    """Spheres and a texture under an intensity that drifts along the first axis: offset −1 → 5 and
    scale 0.5 → 3.5, as a bias field or a z-gradient would, so each window sees other statistics."""
    generator = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in shape), indexing="ij"))
    structure = 0.3 * torch.sin(grid[1] / 3) * torch.cos(grid[2] / 4)
    for _ in range(12):
        centre = torch.rand(3, generator=generator) * torch.tensor(shape, dtype=torch.float32)
        radius = 3 + 4 * torch.rand((), generator=generator)
        structure += (((grid - centre.view(3, 1, 1, 1)) ** 2).sum(0) < radius ** 2).float()
    ramp = torch.linspace(0, 1, shape[0]).view(-1, 1, 1)
    return (structure * (0.5 + 3 * ramp) + (6 * ramp - 1))[None, None]


def unet(norm):
    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm=norm)


def with_learned_running_stats(model, volume):
    """Adaptive layers that normalize per instance in eval but learned running statistics of this volume
    in batch mode (momentum None: their exact average), as a model fine-tuned in instance mode after
    batch-mode training would carry."""
    layers = [module for module in model.modules() if isinstance(module, adanorm.AdaptiveNorm)]
    for layer in layers:
        layer.mode = "batch"
    model.train()
    with torch.no_grad():
        model(volume)
    for layer in layers:
        layer.mode = "instance"
    return model.eval()


ROI, OVERLAP = (32, 32, 32), 0.5


def tiled(model, volume, overlap=OVERLAP, mode="gaussian"):
    return sliding_window_inference(volume, ROI, 2, model, overlap=overlap, mode=mode)


def mismatch(model, volume, source, whole, **options):
    with torch.no_grad(), norm_statistics(model, source, **options) as stats:
        stats.gather(lambda: tiled(model, volume, overlap=0.0))
        prediction = tiled(model, volume)
    return tile_report(prediction, whole, ROI, OVERLAP).mean_difference, stats


def test_running_and_volume_statistics_remove_most_of_the_tile_mismatch_of_a_drifting_volume():
    volume = drifting_volume()
    model = with_learned_running_stats(unet(("adaptive", {"mode": "instance", "momentum": None})), volume)
    with torch.no_grad():
        whole = model(volume)  # per-instance statistics of the whole volume
        per_tile = tile_report(tiled(model, volume), whole, ROI, OVERLAP).mean_difference
    running, running_stats = mismatch(model, volume, "running", whole)
    volume_wide, volume_stats = mismatch(model, volume, "volume", whole)
    assert set(running_stats.layer_sources.values()) == {"running"} and len(running_stats.layer_sources) == 6
    assert volume_stats.passes == 6, "one pass per norm layer: the changes stay above 1e-4 until the last"
    assert per_tile > 0.2, "the drift must make per-tile statistics differ"
    assert running * 5 <= per_tile, (running, per_tile)
    assert volume_wide * 5 <= per_tile, (volume_wide, per_tile)


def test_volume_statistics_of_native_instance_norm_and_running_without_running_statistics():
    volume = drifting_volume()
    model = unet("instance").eval()
    with torch.no_grad():
        whole = model(volume)
        per_tile = tile_report(tiled(model, volume), whole, ROI, OVERLAP).mean_difference
    volume_wide, stats = mismatch(model, volume, "volume", whole)
    assert volume_wide * 5 <= per_tile, (volume_wide, per_tile)
    assert all(isinstance(module, nn.InstanceNorm3d) for name, module in model.named_modules() if name in stats.layer_sources)
    with pytest.raises(ValueError, match=r"6 layer\(s\) .* no learned running statistics: "
                                         r"model\.0\.conv\.unit0\.adn\.N \(InstanceNorm3d\)"):
        norm_statistics(model, "running")
    fallback, stats = mismatch(model, volume, "running", whole, missing="volume")
    assert fallback == volume_wide and set(stats.layer_sources.values()) == {"volume"}
    untouched, stats = mismatch(model, volume, "running", whole, missing="tile")
    assert stats.layer_sources == {} and untouched == pytest.approx(per_tile)


def pointwise_network():
    """1×1×1 convolutions only (nothing crosses a tile border) and a per-sample norm of every kind,
    each after a nonlinearity, so a deeper layer's statistics depend on every earlier one's."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(2, 8, 1), nn.GroupNorm(4, 8), nn.GELU(),
        nn.Conv3d(8, 8, 1), nn.InstanceNorm3d(8, affine=True), nn.Tanh(),
        nn.Conv3d(8, 8, 1), adanorm.AdaptiveNorm3d(8, mode="group", num_groups=2), nn.SiLU(),
        # auto, batch then instance first (the default chain would run group mode, which layer 7 covers): no
        # learned running statistics, so instance
        nn.Conv3d(8, 8, 1), adanorm.AdaptiveNorm3d(8, policy=adanorm.Policy(chain=adanorm.MODES)), nn.ReLU(),
        nn.Conv3d(8, 8, 1), nn.BatchNorm3d(8, track_running_stats=False), nn.Softplus(),  # batch statistics in eval too
        nn.Conv3d(8, 8, 1), nn.BatchNorm3d(8),  # running statistics: tile-independent, left alone
        nn.Conv3d(8, 3, 1),
    ).eval()


def pointwise_case():
    ramp = torch.linspace(0, 1, 32).view(1, 1, 32, 1, 1)
    volume = torch.randn(1, 2, 32, 24, 16, generator=torch.Generator().manual_seed(2)) * (0.5 + 3 * ramp) + 5 * ramp
    model = pointwise_network()
    model[-2].running_mean.uniform_(-1, 1)
    return model, volume, lambda: sliding_window_inference(volume, (16, 12, 8), 3, model, overlap=0.0)


def test_volume_statistics_make_a_tiled_prediction_equal_the_whole_volume_one():
    model, volume, run = pointwise_case()
    with torch.no_grad():
        whole = model(volume)
        assert (run() - whole).abs().max() > 0.1
        with norm_statistics(model, "volume", max_passes=1) as stats:
            stats.gather(run)
            assert (run() - whole).abs().max() > 1e-2, "one pass fixes only the first layer"
        with norm_statistics(model, "volume") as stats:
            assert stats.gather(run) == 5 == stats.passes and len(stats.changes) == 5
            assert list(stats.layer_sources) == ["1", "4", "7", "10", "13"]
            # 1e-5: biased against unbiased variance alone would differ by about 5e-5
            torch.testing.assert_close(run(), whole, rtol=0, atol=1e-5)


def test_a_tolerance_stops_gathering_once_the_statistics_stop_moving():
    model, volume, run = pointwise_case()
    with torch.no_grad(), norm_statistics(model, "volume", tolerance=math.inf) as stats:
        assert stats.gather(run) == 2 and stats.changes[0] == math.inf


def all_forwards_are_the_class_ones(model):
    return all("forward" not in module.__dict__ and not module._forward_hooks and not module._forward_pre_hooks
               for module in model.modules())


def test_the_model_is_restored_exactly_on_exit_and_on_errors():
    model, volume, run = pointwise_case()
    with torch.no_grad():
        before = model(volume)
        state = {key: value.clone() for key, value in model.state_dict().items()}
        with norm_statistics(model, "volume") as stats:
            assert "forward" in model[1].__dict__
            stats.gather(run)
        assert all_forwards_are_the_class_ones(model)
        with pytest.raises(KeyError, match="inside"):
            with norm_statistics(model, "volume") as stats:
                stats.gather(run)
                raise KeyError("inside")
        assert all_forwards_are_the_class_ones(model)
        custom = model[1].forward
        model[1].forward = custom  # an instance-level forward someone set before is what comes back
        with norm_statistics(model, "volume"):
            assert model[1].forward is not custom
        assert model[1].__dict__["forward"] is custom
        del model[1].forward
        torch.testing.assert_close(model(volume), before, rtol=0, atol=0)
        assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
        with norm_statistics(model, "tile") as stats:
            assert stats.gather(run) == 0 and stats.layer_sources == {} and all_forwards_are_the_class_ones(model)


def test_misuse_is_refused_with_what_to_do():
    model, volume, run = pointwise_case()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"call stats.gather\(run\)"):
            with norm_statistics(model, "volume"):
                model(volume)
        stats = norm_statistics(model, "volume")
        with pytest.raises(RuntimeError, match="inside the context"):
            stats.gather(run)
        with pytest.raises(ValueError, match="one volume at a time"):
            with norm_statistics(model, "volume") as stats:
                stats.gather(lambda: model(volume.expand(2, -1, -1, -1, -1)))
        with pytest.raises(ValueError, match=r"model.eval\(\)"):
            norm_statistics(model.train(), "volume")
    with pytest.raises(ValueError, match="source='whole' is unknown"):
        norm_statistics(model, "whole")


@pytest.mark.parametrize("size,roi,overlap", [(64, 32, 0.5), (64, 32, 0.25), (40, 16, 0.5), (30, 16, 0.0),
                                              (17, 16, 0.5), (16, 16, 0.5), (10, 16, 0.5), (33, 8, 0.9)])
def test_window_starts_match_monai(size, roi, overlap):
    image, patch = (max(size, roi),), (roi,)  # MONAI pads a volume smaller than the window first
    interval = _get_scan_interval(image, patch, 1, (overlap,))
    assert window_starts(size, roi, overlap) == [window[0].start for window in dense_patch_slices(image, patch, interval)]


def test_tile_report_measures_difference_and_seams():
    whole = torch.randn(1, 2, 32, 20, 20, generator=torch.Generator().manual_seed(3)).cumsum(2) * 0.2
    shifted = whole.clone()
    shifted[:, :, 16:] += 1.0  # a second window whose exposure differs: a seam at plane 16
    report = tile_report(shifted, whole, (16, 20, 20), 0.0)
    assert report.mean_difference == pytest.approx(0.5 / whole.double().std().item())
    assert report.max_difference == pytest.approx(1.0 / whole.double().std().item())
    assert report.seam > 3 and report.reference_seam == pytest.approx(1, abs=0.3)
    assert tile_report(whole, whole, (16, 20, 20), 0.0).mean_difference == 0
    assert math.isnan(tile_report(whole, whole, 32, 0.0).seam), "one window has no borders"
    assert "tile mismatch" in str(report)


@pytest.fixture(scope="module")
def recipe_checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    return trained_checkpoint(tmp_path_factory.mktemp("recipe"), "unet")


def test_predict_with_volume_statistics_writes_the_segmentation_and_the_tile_report(recipe_checkpoint, tmp_path, capsys):
    scan = write_scan(tmp_path / "scan.nii.gz", (30, 21, 17), np.diag([1.5, 1.0, 2.0, 1.0]))
    output = tmp_path / "out"
    predict_script.main([str(recipe_checkpoint), str(scan), "--output", str(output), "--norm-stats", "volume",
                         "--tile-report", "--accelerator", "cpu"])
    original, predicted = nib.load(scan), nib.load(output / "scan.nii.gz")
    assert predicted.shape == original.shape and predicted.get_data_dtype() == np.uint8
    np.testing.assert_allclose(predicted.affine, original.affine)
    with open(output / "tile_report.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["image"] == str(scan) and float(row["mean_difference"]) >= 0 and "seam" in row
    printed = capsys.readouterr().out
    assert "scan.nii.gz: tile mismatch" in printed and "tile report:" in printed


def test_predict_with_running_statistics_names_the_layers_without_them(recipe_checkpoint, tmp_path):
    scan = write_scan(tmp_path / "scan.nii.gz", (20, 20, 20), np.eye(4))
    with pytest.raises(ValueError, match=r"no learned running statistics: model\.0\.adn\.N \(AdaptiveNorm3d\)"):
        predict_script.main([str(recipe_checkpoint), str(scan), "--output", str(tmp_path / "out"),
                             "--norm-stats", "running", "--accelerator", "cpu", "--verbose"])


class SkipCroppingUNet(nn.Module):
    """A two-level U-Net (size multiple 4) with instance, group and adaptive norms. Its forward needs sizes that are
    multiples of 4, unless ``crop_skips`` crops each upsampled map to its skip connection's size: then it runs at any
    size and is, written out directly, the forward ``whole_volume_prediction`` promises there."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.crop_skips = False
        self.encode = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.PReLU())
        self.down1 = nn.Sequential(nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv3d(8, 8, 3, stride=2, padding=1), adanorm.AdaptiveNorm3d(8), nn.ReLU())
        self.up2 = nn.ConvTranspose3d(8, 8, 2, stride=2)
        self.decode1 = nn.Sequential(nn.Conv3d(16, 8, 3, padding=1), nn.InstanceNorm3d(8), nn.ReLU())
        self.up1 = nn.ConvTranspose3d(8, 4, 2, stride=2)
        self.decode0 = nn.Sequential(nn.Conv3d(8, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU(),
                                     nn.Conv3d(4, 2, 1))
        for module in self.modules():
            if isinstance(module, (nn.InstanceNorm3d, nn.GroupNorm, adanorm.AdaptiveNorm)) and module.weight is not None:
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)
        self.eval()

    def join(self, upsampled, skip):
        if self.crop_skips:
            upsampled = upsampled[(..., *(slice(0, size) for size in skip.shape[2:]))]
        return torch.cat([upsampled, skip], 1)

    def forward(self, volume):
        level0 = self.encode(volume)
        level1 = self.down1(level0)
        decoded1 = self.decode1(self.join(self.up2(self.down2(level1)), level1))
        return self.decode0(self.join(self.up1(decoded1), level0))


def cropping_reference(model, volume):
    """The brute-force whole-volume forward: the network itself, run unpadded, its upsampled maps cropped."""
    model.crop_skips = True
    try:
        with torch.no_grad():
            return model(volume)
    finally:
        model.crop_skips = False


def test_downsampling_factors_are_the_size_multiples_the_networks_need():
    example = torch.zeros(1, 1, 32, 32, 32)
    monai_unet = UNet(3, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=0).eval()
    assert downsampling_factors(monai_unet, example) == (8, 8, 8)
    with torch.no_grad():
        assert monai_unet(torch.zeros(1, 1, 8, 16, 24)).shape[2:] == (8, 16, 24)
        with pytest.raises(RuntimeError):
            monai_unet(torch.zeros(1, 1, 12, 16, 24))  # 12 is not a multiple of 8
    assert downsampling_factors(BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)).eval(), example) == (16, 16, 16)
    anisotropic = DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, [2, 2, 1], 2], upsample_kernel_size=[[2, 2, 1], 2],
                          filters=[4, 8, 16]).eval()
    assert downsampling_factors(anisotropic, example) == (4, 4, 2)
    assert downsampling_factors(SkipCroppingUNet(), example) == (4, 4, 4)
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        downsampling_factors(SkipCroppingUNet().train(), example)


def test_whole_volume_prediction_of_an_odd_size_takes_statistics_from_real_voxels_only():
    model = SkipCroppingUNet()
    volume = drifting_volume((37, 41, 29))
    with pytest.raises(RuntimeError):
        model(volume)  # the network cannot run on this size as it is
    reference = cropping_reference(model, volume)
    prediction = whole_volume_prediction(model, volume, (4, 4, 4))
    assert prediction.shape == reference.shape == (1, 2, 37, 41, 29)
    torch.testing.assert_close(prediction, reference, rtol=0, atol=1e-4)
    assert all_forwards_are_the_class_ones(model), "its hooks are removed"
    with torch.no_grad():  # zero padding that entered the statistics would be far off
        padded = model(torch.nn.functional.pad(volume, [0, 3, 0, 3, 0, 3]))[..., :37, :41, :29]
    assert (padded - reference).abs().max() > 0.1
    multiple = volume[..., :36, :40, :28]
    torch.testing.assert_close(whole_volume_prediction(model, multiple, (4, 4, 4)), model(multiple), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass one"):
        whole_volume_prediction(model, volume.expand(2, -1, -1, -1, -1), (4, 4, 4))


def report_by_hand(tiled, whole):
    """Mean and max |tiled − whole| in units of the whole-volume prediction's std, computed here directly."""
    difference = (tiled.double() - whole.double()).abs()
    scale = whole.double().std()
    return float(difference.mean() / scale), float(difference.max() / scale)


def reported_tile_mismatch(network, volume, overlap=0.5):
    """The tile report predict_step records for ``volume`` with 32^3 windows, and the sliding-window prediction."""
    module = SegmentationModule({"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1,
                                 "out_channels": 2, "channels": [4, 8, 16, 32], "strides": [2, 2, 2],
                                 "num_res_units": 0, "norm": "instance"}, num_classes=2, patch_size=ROI,
                                predict_overlap=overlap)
    if network is not None:
        module.net = network
    module.eval()
    module.tile_reports = []
    image = MetaTensor(volume, meta={"filename_or_obj": ["scan.nii.gz"]})
    with torch.no_grad():
        module.predict_step({"image": image}, 0)
        tiled_prediction = module.infer(volume, overlap)
    ((name, report),) = module.tile_reports
    assert name == "scan.nii.gz"
    return report, tiled_prediction, module.net


def test_tile_report_of_48_cubed_volumes_with_32_cubed_windows_is_against_the_unpadded_prediction():
    report, tiled_prediction, network = reported_tile_mismatch(None, drifting_volume((48, 48, 48)))
    with torch.no_grad():
        whole = network(drifting_volume((48, 48, 48)))  # the network accepts 48 (a multiple of its 8): no padding
    mean, largest = report_by_hand(tiled_prediction, whole)
    assert report.mean_difference == pytest.approx(mean, rel=1e-9)
    assert report.max_difference == pytest.approx(largest, rel=1e-9)


def test_tile_report_of_an_odd_size_is_against_the_brute_force_whole_volume_prediction():
    volume = drifting_volume((37, 41, 29))
    report, tiled_prediction, network = reported_tile_mismatch(SkipCroppingUNet(), volume)
    mean, largest = report_by_hand(tiled_prediction, cropping_reference(network, volume))
    assert report.mean_difference == pytest.approx(mean, rel=1e-4)
    assert report.max_difference == pytest.approx(largest, rel=1e-3, abs=1e-4)
