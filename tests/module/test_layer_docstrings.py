"""``help(adanorm.AdaptiveNorm3d)`` shows the class's own docstring only: each layer class must document
every constructor argument itself, torch-style (an ``Args:`` entry ``name (type): ...``)."""
import inspect
import re

import pytest

import adanorm


@pytest.mark.parametrize("layer_class", [adanorm.AdaptiveNorm, adanorm.AdaptiveNorm1d, adanorm.AdaptiveNorm2d,
                                         adanorm.AdaptiveNorm3d], ids=lambda cls: cls.__name__)
def test_every_constructor_argument_is_documented_in_the_class_docstring(layer_class):
    docstring = layer_class.__doc__
    parameters = list(inspect.signature(layer_class).parameters)
    assert "num_features" in parameters and "policy" in parameters
    undocumented = [name for name in parameters if not re.search(rf"^    {name} \(", docstring, re.MULTILINE)]
    assert not undocumented, f"{layer_class.__name__}: no Args: entry for {undocumented}"
    for section in ("Shape:", "Attributes:", "Examples::"):
        assert section in docstring
    for attribute in ("mode_counts", "last_mode", "nonfinite_skips"):
        assert re.search(rf"^    {attribute} \(", docstring, re.MULTILINE), attribute


def test_forward_is_documented():
    assert inspect.getdoc(adanorm.AdaptiveNorm3d.forward)
