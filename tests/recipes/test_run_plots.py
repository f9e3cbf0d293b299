"""The run's plots and the metric keys they read: NormMetric builds and parses NormModeMonitor's keys, and the
monitor counts as fallbacks only the forwards that fell back."""
import warnings

import lightning.pytorch as pl
import matplotlib.image
import pytest
import torch
from torch import nn

import adanorm
from adanorm.integrations.lightning import NormMetric, NormModeMonitor
from adanorm.recipes.plots import FELL_BACK, norm_modes_figure, plot_norm_modes, stage_modes

pytestmark = pytest.mark.slow  # recipe runs, subprocesses or builds: the full suite's part

LONG_LAYER = "net.model.1.submodule.1.submodule.1.submodule.1.submodule.1.submodule.adn.N"
LAYERS = ("net.model.0.adn.N", LONG_LAYER)


def monitor_rows(train_modes, eval_modes="instance", forwards=4.0, train_fell_back=0.0):
    """What NormModeMonitor logs per epoch: the training row and the eval row, one mode per stage."""
    rows = []
    for epoch in range(2):
        for stage, mode, fell_back in (("train", train_modes, train_fell_back), ("eval", eval_modes, 0.0)):
            row = {"epoch": float(epoch)}
            for layer in LAYERS:
                row[NormMetric(stage, layer, mode).key()] = forwards
                row[NormMetric(stage, layer, "fallback_fraction").key()] = fell_back
            row[NormMetric(stage, "", "fallback_fraction").key()] = fell_back
            rows.append(row)
    return rows


@pytest.mark.parametrize("metric, key", [
    (NormMetric("train", "net.model.0.adn.N", "instance"), "norm/train/net.model.0.adn.N/instance"),
    (NormMetric("eval", "net.model.0.adn.N", "fallback_fraction"), "norm/eval/net.model.0.adn.N/fallback_fraction"),
    (NormMetric("train", "", "fallback_fraction"), "norm/train/fallback_fraction"),
])
def test_norm_metric_keys_round_trip(metric, key):
    assert metric.key() == key and NormMetric.parse(key) == metric
    assert NormMetric.parse(metric.key("adanorm/modes"), "adanorm/modes") == metric


@pytest.mark.parametrize("key", ["val/dice", "norm/test/x/instance", "norm/train/x/median", "norm/train/instance",
                                 "other/train/x/instance", "train/loss_epoch"])
def test_norm_metric_parse_rejects_other_keys(key):
    assert NormMetric.parse(key) is None


def test_stage_modes_sums_the_run():
    rows = monitor_rows("instance", train_fell_back=1.0)
    train = stage_modes(rows, "train")
    assert list(train.modes) == list(LAYERS)
    assert train.modes[LONG_LAYER]["instance"] == 1.0 and train.fell_back[LONG_LAYER] == 1.0
    assert stage_modes(rows, "eval").fell_back == dict.fromkeys(LAYERS, 0.0)


def figure_texts(figure):
    return [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))]


def hatched_bars(figure):
    return [patch for axis in figure.axes for patch in axis.patches if patch.get_hatch() and patch.get_width() > 0]


def test_norm_modes_shows_the_designed_path_neutrally():
    """Group statistics below min_batch_size are the design: NormModeMonitor logs no fallback for them, and the
    figure neither hatches nor names one."""
    figure = norm_modes_figure(monitor_rows("group", eval_modes="group"))
    texts = " | ".join(figure_texts(figure))
    assert "training forwards: group in every layer" in texts and "eval forwards: group in every layer" in texts
    assert texts.count("no fallbacks") == 2
    assert "fell back" not in texts and "later mode" not in texts and "first choice" not in texts
    assert not hatched_bars(figure)


def test_norm_modes_marks_only_real_fallbacks():
    figure = norm_modes_figure(monitor_rows("layer", train_fell_back=0.5))
    texts = " | ".join(figure_texts(figure))
    assert "2 of 2 layers fell back: spatial size too small (50% of forwards, hatched)" in texts
    assert "no fallbacks" in texts  # eval
    legend = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert FELL_BACK in legend and FELL_BACK == "fell back (spatial size too small)"
    assert [patch.get_width() for patch in hatched_bars(figure)] == [0.5, 0.5]


def test_norm_modes_shows_mixed_modes_as_shares():
    rows = monitor_rows("instance") + [{"epoch": 2.0, **{NormMetric("train", layer, "batch").key(): 8.0 for layer in LAYERS},
                                        **{NormMetric("train", layer, "fallback_fraction").key(): 0.0 for layer in LAYERS}}]
    texts = " | ".join(figure_texts(norm_modes_figure(rows)))
    assert "training forwards: batch 50%, instance 50%" in texts


def test_norm_modes_png_keeps_the_longest_layer_name_inside_the_image(tmp_path):
    figure = norm_modes_figure(monitor_rows("instance"))
    assert LONG_LAYER.removeprefix("net.") in [label.get_text() for label in figure.axes[0].get_yticklabels()]
    image = matplotlib.image.imread(plot_norm_modes(monitor_rows("instance"), tmp_path / "norm_modes.png"))[..., :3]
    ink = image.mean(axis=2) < 0.9
    assert not ink[:, :2].any() and not ink[:, -2:].any(), "a layer name (or another text) runs off the image"


class TwoDepths(pl.LightningModule):
    """A layer on the 4³ patch (group statistics at batch 2, as designed) and one after global pooling (1×1×1:
    two values per group, too few for group mode, so it falls back to layer mode)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), adanorm.AdaptiveNorm3d(8))
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(8, 8, 1), adanorm.AdaptiveNorm3d(8))

    def training_step(self, batch, batch_index):
        return self.pooled(self.patch(batch)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_monitor_counts_no_fallback_on_the_designed_path():
    """Default policy at batch 2: group statistics are the design (fallback_fraction 0); only the 1×1×1 layer
    fell back."""
    trainer = pl.Trainer(max_epochs=1, callbacks=[NormModeMonitor()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and logging, and the pooled layer's fallback
        trainer.fit(TwoDepths(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(6, 1, 4, 4, 4), batch_size=2))
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert logged["norm/train/patch.1/group"] == 3 and logged["norm/train/patch.1/fallback_fraction"] == 0
    assert logged["norm/train/pooled.2/layer"] == 3 and logged["norm/train/pooled.2/fallback_fraction"] == 1
    assert logged["norm/train/fallback_fraction"] == 0.5
