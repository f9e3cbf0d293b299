"""The run's plots and the metric keys they read: NormMetric builds and parses NormModeMonitor's keys."""
import matplotlib.image
import pytest

from adanorm.integrations.lightning import NormMetric
from adanorm.recipes.plots import norm_modes_figure, plot_norm_modes, stage_modes

LONG_LAYER = "net.model.1.submodule.1.submodule.1.submodule.1.submodule.1.submodule.adn.N"
LAYERS = ("net.model.0.adn.N", LONG_LAYER)


def monitor_rows(train_modes, eval_modes="instance", forwards=4.0):
    """What NormModeMonitor logs per epoch: the training row and the eval row, one mode per stage."""
    rows = []
    for epoch in range(2):
        for stage, mode, fell_back in (("train", train_modes, 1.0), ("eval", eval_modes, 0.0)):
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
    rows = monitor_rows("instance")
    train = stage_modes(rows, "train")
    assert list(train.modes) == list(LAYERS)
    assert train.modes[LONG_LAYER]["instance"] == 1.0 and train.later[LONG_LAYER] == 1.0
    assert stage_modes(rows, "eval").later == dict.fromkeys(LAYERS, 0.0)


def figure_texts(figure):
    return [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))]


def test_norm_modes_names_the_mode_each_layer_ran_in_neutral_words():
    figure = norm_modes_figure(monitor_rows("instance"))
    texts = " | ".join(figure_texts(figure))
    assert "training forwards: instance in every layer" in texts and "eval forwards: instance in every layer" in texts
    assert "2 of 2 layers ran a later mode of the chain than their first choice" in texts
    assert "every forward ran its layer's first choice" in texts
    assert "fell back" not in texts


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
