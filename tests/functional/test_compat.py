"""adanorm.functional._compat: where torch has the private API, the public fallback beside it gives
the same answer, so a torch release that drops the private one changes no layout; and no other module
calls a private torch API."""
import ast
from pathlib import Path
from typing import Iterator, Optional, Tuple

import pytest
import torch

import adanorm
from adanorm.functional import _compat

_private = pytest.importorskip("torch._prims_common").suggest_memory_format


def _channels_last(shape):
    return torch.randn(shape).contiguous(memory_format=torch.channels_last_3d if len(shape) == 5 else torch.channels_last)


INPUTS = {
    "contiguous 5d": lambda: torch.randn(2, 6, 3, 4, 5),
    "channels-last 5d": lambda: _channels_last((2, 6, 3, 4, 5)),
    "channels-last 4d": lambda: _channels_last((2, 6, 3, 4)),
    "strided channels-last view": lambda: _channels_last((2, 6, 4, 4, 8))[..., ::2],
    "strided contiguous view": lambda: torch.randn(2, 6, 4, 4, 8)[..., ::2],
    "transposed": lambda: torch.randn(2, 6, 3, 4, 5).transpose(2, 4),
    "channels moved last by permute": lambda: torch.randn(2, 3, 4, 6).permute(0, 3, 1, 2),
    "3d": lambda: torch.randn(4, 6, 7),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_public_suggest_memory_format_matches_torchs(name):
    x = INPUTS[name]()
    assert _compat.public_suggest_memory_format(x) == _private(x)
    assert _compat.suggest_memory_format(x) == _private(x)


def test_both_answers_are_reached():
    """The inputs above cover channels-last and contiguous answers, so the comparison can fail."""
    answers = {_compat.public_suggest_memory_format(make()) for make in INPUTS.values()}
    assert answers == {torch.contiguous_format, torch.channels_last, torch.channels_last_3d}


PACKAGE = Path(adanorm.__file__).resolve().parent


def _dotted(node: ast.AST) -> Optional[str]:
    """``a.b.c`` for an attribute chain on a plain name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _private_torch(name: str) -> bool:
    root, *rest = name.split(".")
    if rest[:2] == ["ops", "adanorm"]:  # adanorm's own operators (csrc/norm_cpu_ops.cpp), whatever their names
        return False
    return root in ("torch", "cpp_extension") and any(part.startswith("_") and not part.startswith("__") for part in rest)


def _names_used(path: Path) -> Iterator[Tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.Attribute) and _dotted(node):
            yield node.lineno, _dotted(node)


def test_private_torch_apis_are_called_from_the_compat_module_only():
    """pyproject.toml admits several torch releases: a private API one of them moves must break one function."""
    found = sorted({f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
                    for path in PACKAGE.rglob("*.py") if path.name != "_compat.py"
                    for line, name in _names_used(path) if _private_torch(name)})
    assert not found, "private torch APIs outside adanorm/functional/_compat.py:\n" + "\n".join(found)
