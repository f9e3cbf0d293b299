"""The public API is documented in torch's docstring style: every parameter of every public callable
has its own entry under ``Args:``, and the examples in the docstrings run.

Public means exported by ``adanorm`` or ``adanorm.functional`` (their ``__all__``), or defined in an
integration module under a name without a leading underscore.
"""
import doctest
import importlib
import inspect
import re
import warnings
from types import ModuleType
from typing import Callable, Iterator, List, Set, Tuple

import pytest

import adanorm
import adanorm.functional
from adanorm.integrations import lightning as lightning_integration
from adanorm.integrations import monai as monai_integration


def _exported(module: ModuleType) -> Iterator[Tuple[str, Callable]]:
    for name in module.__all__:
        yield f"{module.__name__}.{name}", getattr(module, name)


def _defined_in(module: ModuleType) -> Iterator[Tuple[str, Callable]]:
    for name, value in vars(module).items():
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__:
            yield f"{module.__name__}.{name}", value


def _public_callables() -> List[Tuple[str, Callable]]:
    found = [*_exported(adanorm), *_exported(adanorm.functional),
             *_defined_in(lightning_integration), *_defined_in(monai_integration)]
    return [(name, value) for name, value in found if callable(value)]


def _parameters(obj: Callable) -> List[str]:
    """Parameter names a caller passes: no ``self``, no ``*args``/``**kwargs`` (nothing to name)."""
    try:
        signature = inspect.signature(obj)
    except ValueError:  # exceptions and warnings: builtin constructors take only a message
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind not in variadic and p.name != "self"]


def _args_entries(docstring: str) -> Set[str]:
    """Names with an entry in the ``Args:`` section (``name (type): ...`` or ``name: ...``)."""
    lines = inspect.cleandoc(docstring).splitlines()
    if "Args:" not in (line.strip() for line in lines):
        return set()
    start = [line.strip() for line in lines].index("Args:")
    header_indent = len(lines[start]) - len(lines[start].lstrip())
    entries: Set[str] = set()
    entry_indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= header_indent:
            break  # the next section
        entry_indent = indent if entry_indent is None else entry_indent
        match = re.match(r"\*{0,2}(\w+)\s*(\([^)]*\))?\s*:", line.strip())
        if indent == entry_indent and match:
            entries.add(match.group(1))
    return entries


PUBLIC = _public_callables()


def test_the_public_api_is_found():
    names = {name for name, _ in PUBLIC}
    assert {"adanorm.convert", "adanorm.update_bn", "adanorm.functional.adaptive_norm",
            "adanorm.integrations.lightning.RecalibrateNorms", "adanorm.integrations.monai.register"} <= names


@pytest.mark.parametrize("name,obj", [pytest.param(name, obj, id=name) for name, obj in PUBLIC])
def test_every_parameter_has_an_args_entry(name, obj):
    docstring = inspect.getdoc(obj)
    assert docstring, f"{name} has no docstring"
    documented = set().union(*(_args_entries(inspect.getdoc(owner) or "") for owner in _documenting(obj)))
    undocumented = [parameter for parameter in _parameters(obj) if parameter not in documented]
    assert not undocumented, f"{name}: no Args: entry for {undocumented}"


def _documenting(obj: Callable) -> List[Callable]:
    """Where ``obj``'s parameters may be documented: its own docstring, and for a class that inherits
    its constructor (``AdaptiveNorm3d``), the docstring of the class that defines it, as torch
    documents a constructor once."""
    if not inspect.isclass(obj):
        return [obj]
    constructor_owner = next((cls for cls in obj.__mro__ if "__init__" in vars(cls) or "__new__" in vars(cls)), obj)
    return [obj, constructor_owner]


def test_args_entries_are_parsed_per_entry_not_per_word():
    docstring = """Summary that mentions eps in passing.

    Args:
        input (Tensor): the input; its continuation line
            names weight: but is no entry.
        **kwargs: passed on.

    Returns:
        Tensor: bias: not an argument either.
    """
    assert _args_entries(docstring) == {"input", "kwargs"}


DOCTEST_MODULES = [
    "adanorm.convert", "adanorm.presets", "adanorm.recalibration", "adanorm.norm", "adanorm.policy",
    "adanorm.tiling", "adanorm.functional.api", "adanorm.functional.renorm",
    "adanorm.integrations.lightning", "adanorm.integrations.monai",
]


@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adanorm.FallbackWarning)  # examples show fallbacks on purpose
        results = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    if results.attempted == 0:
        pytest.skip(f"{module_name} has no examples")
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples in {module_name} failed (output above)"
