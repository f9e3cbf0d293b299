"""README.md and docs/*.md do what they say: every Python snippet runs as written, every ``adanorm-train`` and
``adanorm-predict`` command line parses against the real configs and options, every repository path and
``adanorm.*`` name they mention exists, and the README stays a front door of at most 12 kB.

A fenced block is a snippet by its language: ```python runs, ```bash is parsed for the two commands, ```json is
parsed (and its ``norm_op`` built), ```text is prose. ``<!-- no-run -->`` on the line above a block keeps it from
running (for what needs a GPU or a user's files); ``<!-- slow -->`` marks a snippet that takes more than a few
seconds, so ``pytest -m "not slow"`` leaves it out.
"""
from __future__ import annotations

import importlib
import json
import pydoc
import re
import shlex
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import FrozenSet, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch

pytestmark = pytest.mark.slow  # recipe runs, subprocesses or builds: the full suite's part

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = (README, *sorted((REPO / "docs").glob("*.md")))
README_MAX_BYTES = 12 * 1024
MAX_LINE_CHARS = 120  # tables may be wider in docs/, where a row cannot wrap

MARKER = re.compile(r"<!--\s*(no-run|slow)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PATH_LIKE = re.compile(r"[\w.<>*-]+(/[\w.<>*-]*)*")
REPO_FILE_SUFFIXES = (".py", ".md", ".yaml", ".toml", ".cpp")
ADANORM_NAME = re.compile(r"adanorm(\.[A-Za-z_]\w*)+")
# Path-like text that names no file of the repository: what a run writes (relative to where it runs), a user's data
# folders, and the metric names the recipes log.
NOT_IN_REPO = ("outputs/", "multirun/", "predictions/", "checkpoints/", "csv/", "tensorboard/", ".hydra/", "<run>/",
               "scans/", "imagesTr/", "labelsTr/", "val/", "norm/")
# Command-line values that stand for the reader's own paths; composed with a temporary folder in their place.
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|.*<[^>]*>.*")


@dataclass(frozen=True)
class Block:
    """A fenced code block: the page, the line of its opening fence, its language, text and markers."""

    page: Path
    line: int
    language: str
    text: str
    markers: FrozenSet[str]

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> List[Block]:
    """Every fenced block of ``page``, with the ``<!-- ... -->`` markers on the lines right above it."""
    blocks: List[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    opened: Optional[Tuple[int, str, FrozenSet[str]]] = None
    body: List[str] = []
    markers: set = set()
    for number, line in enumerate(lines, start=1):
        fence = FENCE.match(line)
        if opened is None and fence:
            opened, body, markers = (number, fence.group(1), frozenset(markers)), [], set()
        elif opened is not None and line.strip() == "```":
            blocks.append(Block(page, opened[0], opened[1], "\n".join(body) + "\n", opened[2]))
            opened = None
        elif opened is not None:
            body.append(line)
        if opened is None and not fence:
            marker = MARKER.fullmatch(line.strip())
            markers = markers | {marker.group(1)} if marker else set()
    assert opened is None, f"{page.name}: the block opened at line {opened[0]} is never closed"
    return blocks


def prose(text: str) -> str:
    """``text`` without its fenced blocks, whose contents are code rather than references."""
    return re.sub(r"^```\w*\s*$.*?^```\s*$", "", text, flags=re.MULTILINE | re.DOTALL)


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    return {github_anchor(line.lstrip("#")) for line in prose(page.read_text(encoding="utf-8")).splitlines()
            if line.startswith("#")}


def repository_path(text: str) -> Optional[str]:
    """``text`` as a repository path if it looks like one (a single path-like word with a ``/``, or a file name
    with a source or doc suffix), else None; run outputs and user folders are not."""
    if not PATH_LIKE.fullmatch(text) or not ("/" in text or text.endswith(REPO_FILE_SUFFIXES)):
        return None
    if text.startswith(NOT_IN_REPO):
        return None
    return text


def broken_references(page: Path, text: str) -> List[str]:
    """Backticked repository paths that do not exist (relative to the repository root) and relative links whose
    file or heading does not exist (relative to ``page``)."""
    broken = []
    body = prose(text)
    for code in INLINE_CODE.findall(body):
        path = repository_path(code.strip())
        if path is not None and not (REPO / path).exists():
            broken.append(f"`{path}`")
    for target in LINK.findall(body):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"({target})")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"({target}): no such heading")
    return broken


def resolve_name(dotted: str) -> object:
    """The object a dotted ``adanorm.…`` name denotes: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            found: object = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


def shell_commands(block: Block) -> Iterator[List[str]]:
    """The simple commands of a ```bash block, as words: comments dropped, lists (&&, ;, |) split, leading
    environment assignments dropped."""
    for line in block.text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        command: List[str] = []
        for word in [*words, ";"]:
            if word in ("&&", "||", ";", "|"):
                if command:
                    yield command
                command = []
            elif command or not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word):
                command.append(word)


def arguments_of(command: List[str], *programs: str) -> Optional[List[str]]:
    """The arguments when ``command`` runs one of ``programs`` (``adanorm-x`` or ``python x.py``), else None."""
    for program in programs:
        for prefix in ([program], ["python", f"{program.split('-')[1]}.py"]):
            if command[:len(prefix)] == prefix:
                return command[len(prefix):]
    return None


HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i")


def overrides_to_compose(arguments: Sequence[str], stand_in: Path) -> List[List[str]]:
    """The override lists one ``adanorm-train`` command line composes: one per job of a ``-m`` sweep. Flags and
    ``ckpt_path=`` (a resume reads an earlier run) are left out; placeholder values become ``stand_in``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept, skip_value = [], False
    for argument in arguments:
        if skip_value or argument.startswith("-"):
            skip_value = not skip_value and argument in HYDRA_FLAGS_WITH_VALUE
            continue
        key, _, value = argument.partition("=")
        if key == "ckpt_path":
            continue
        kept.append(f"{key}={stand_in}" if PLACEHOLDER.fullmatch(value) else argument)
    choices = []
    for override in OverridesParser.create().parse_overrides(kept):
        if override.is_sweep_override():
            choices.append([f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in product(*choices)]


BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]


def runnable(language: str) -> List:
    return [pytest.param(block, id=block.name, marks=[pytest.mark.slow] if "slow" in block.markers else [])
            for block in BLOCKS if block.language == language and "no-run" not in block.markers]


def commands(*programs: str) -> List:
    found = []
    for block in BLOCKS:
        if block.language == "bash" and "no-run" not in block.markers:
            for command in shell_commands(block):
                arguments = arguments_of(command, *programs)
                if arguments is not None:
                    found.append(pytest.param(arguments, id=f"{block.name} {' '.join(arguments)}".strip()))
    return found


TRAIN_COMMANDS = commands("adanorm-train")
PREDICT_COMMANDS = commands("adanorm-predict")


def test_readme_is_a_front_door():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; keep it at most {README_MAX_BYTES} and move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_lines_are_short(page):
    long_lines = [f"{page.name}:{number} ({len(line)} characters)"
                  for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1)
                  if len(line) > MAX_LINE_CHARS and not (page != README and line.startswith("|"))]
    assert not long_lines, long_lines


def test_the_pages_have_snippets_and_commands():
    """The extraction below finds what is there (a parser that finds nothing would pass every test)."""
    assert {p.name for p in PAGES} >= {"README.md", "layer.md", "recipes.md", "inference.md", "conversion.md",
                                       "reliability.md", "performance.md", "distributed.md", "nnunet.md"}
    assert len(runnable("python")) >= 10
    assert len(TRAIN_COMMANDS) >= 10 and PREDICT_COMMANDS
    assert any(block.page == README and block.language == "python" for block in BLOCKS)


@pytest.mark.parametrize("block", runnable("python"))
def test_python_snippet_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a snippet writes (unet.onnx, ...) land here
    torch.manual_seed(0)
    exec(compile(block.text, block.name, "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("block", runnable("json"))
def test_json_snippet_parses_and_builds_its_norm_op(block):
    """A plans fragment (``"key": value, ...``) is read as nnU-Net reads the plans: ``norm_op`` located by name
    and built with ``norm_op_kwargs``, so a renamed policy or argument fails here."""
    text = block.text.strip()
    fragment = json.loads(text if text.startswith(("{", "[")) else "{" + text.rstrip(",") + "}")
    if "norm_op" in fragment:
        norm_op = pydoc.locate(fragment["norm_op"])
        assert norm_op is not None, f"{block.name}: {fragment['norm_op']} does not resolve"
        norm_op(8, **fragment.get("norm_op_kwargs", {}))


@pytest.fixture(scope="module")
def hydra_configs():
    """Hydra's compose API over the packaged configs, with the resolvers ``adanorm-train`` registers first."""
    from hydra import initialize_config_module

    from adanorm.recipes.cli import CONFIG_PATH
    from adanorm.recipes.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_module(config_module=CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        yield


def compose_resolved(overrides: Sequence[str], output_dir: Path) -> dict:
    """The config ``adanorm-train`` would run with, every interpolation resolved (``output_dir`` stands in for
    Hydra's run folder, which only a real run has)."""
    from hydra import compose
    from omegaconf import OmegaConf

    from adanorm.recipes.cli import CONFIG_NAME

    config = compose(config_name=CONFIG_NAME, overrides=[*overrides, f"output_dir={output_dir}"])
    return OmegaConf.to_container(config, resolve=True)


@pytest.mark.parametrize("arguments", TRAIN_COMMANDS)
def test_train_command_composes(arguments, hydra_configs, tmp_path):
    for overrides in overrides_to_compose(arguments, tmp_path):
        compose_resolved(overrides, tmp_path)


@pytest.mark.parametrize("overrides", [["norm=no_such_norm"], ["data.no_such_key=1"], ["norm=batch", "norm.preset=auto"]])
def test_a_renamed_or_refused_option_fails_to_compose(overrides, hydra_configs, tmp_path):
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose_resolved(overrides, tmp_path)


def test_every_config_group_and_option_is_in_the_recipes_table(hydra_configs):
    """What ``adanorm-train --help`` lists (Hydra's config groups and their options) has a row in docs/recipes.md."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    groups = [group for group in loader.list_groups("") if group != "hydra"]
    rows = {line.split("|")[1].strip(): line for line in (REPO / "docs" / "recipes.md").read_text().splitlines()
            if line.startswith("| `")}
    assert {"model", "norm", "data", "trainer", "task"} <= set(groups)
    missing = [f"{group}={option}" for group in groups for option in loader.get_group_options(group)
               if f"`{option}`" not in rows.get(f"`{group}`", "")]
    assert not missing, f"docs/recipes.md's config-group table lacks {missing}"


@pytest.mark.parametrize("arguments", PREDICT_COMMANDS)
def test_predict_command_parses(arguments):
    from adanorm.recipes.cli import predict_parser

    predict_parser("adanorm-predict").parse_args(arguments)


def test_sweeps_expand_and_placeholders_are_replaced(tmp_path):
    jobs = overrides_to_compose(["-m", "norm=adaptive,batch", "data.root=PATH", "ckpt_path=<run>/last.ckpt"], tmp_path)
    assert jobs == [["norm=adaptive", f"data.root={tmp_path}"], ["norm=batch", f"data.root={tmp_path}"]]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_named_paths_and_links_exist(page):
    broken = broken_references(page, page.read_text(encoding="utf-8"))
    assert not broken, f"{page.relative_to(REPO)} names what the repository lacks: {broken}"


def test_a_missing_path_or_heading_is_reported():
    text = ("`adanorm/no_such_folder/`, `benchmarks/norms.py`, `no_such_file.py`, `outputs/<date>/`, `~/.cache/x`,\n"
            "[gone](../NO_SUCH.md), [here](#no-such-heading), [layer](layer.md#the-eval-rule)\n"
            "```bash\nadanorm-train data.root=not/a/repo/path\n```\n")
    assert broken_references(REPO / "docs" / "recipes.md", text) == [
        "`adanorm/no_such_folder/`", "`no_such_file.py`", "(../NO_SUCH.md)", "(#no-such-heading): no such heading"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_named_adanorm_objects_exist(page):
    names = {match.group(0) for code in INLINE_CODE.findall(prose(page.read_text(encoding="utf-8")))
             for match in [ADANORM_NAME.match(code)] if match}
    missing = []
    for name in sorted(names):
        try:
            resolve_name(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"{page.relative_to(REPO)} names what adanorm lacks: {missing}"


def test_markers_and_block_languages_are_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- no-run -->\n```python\nraise SystemExit\n```\n\n<!-- slow -->\n```python\npass\n```\n"
                    "```bash\nX=1 adanorm-train a=1 && python train.py -m b=1,2  # c=3\n```\n")
    blocks = fenced_blocks(page)
    assert [(block.language, block.markers) for block in blocks] == [
        ("python", {"no-run"}), ("python", {"slow"}), ("bash", frozenset())]
    assert [arguments_of(c, "adanorm-train") for c in shell_commands(blocks[2])] == [["a=1"], ["-m", "b=1,2"]]
