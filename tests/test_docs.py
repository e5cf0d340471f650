"""The README and docs/*.md say only what the code has: links resolve, every python block
compiles and its imports and the names it reads off seqpar exist, every command names a make
target, module or seqpar subcommand that exists.

The blocks are not run: they launch ranks, load models or take minutes. What can drift silently
-- a renamed function, a moved module, a removed make target, a page no longer linked -- is
what is checked."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from seqpar.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def blocks(page: Path, language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(page.read_text()) if lang == language]


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"{page.name} is not linked from the README"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target, _ in LINK.findall(page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: link to {target} leads nowhere"


def _resolve(module_name: str, attributes: list[str]) -> None:
    obj = importlib.import_module(module_name)
    for name in attributes:
        if not hasattr(obj, name):
            try:  # a submodule not imported by its package
                obj = importlib.import_module(f"{obj.__name__}.{name}")
                continue
            except (ImportError, AttributeError):
                raise AssertionError(f"{module_name}.{'.'.join(attributes)}: no {name!r}")
        obj = getattr(obj, name)


def _attribute_chain(node: ast.AST) -> list[str] | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(names)]
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_compile_and_their_names_exist(page):
    """Each block parses; each `import` / `from ... import` of seqpar, torch or the standard
    library resolves; each `seqpar....` / `<alias>....` attribute chain the block reads exists."""
    for code in blocks(page, "python"):
        tree = ast.parse(code)
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ("seqpar", "torch"):
                        importlib.import_module(alias.name)
                        aliases[alias.asname or alias.name.split(".")[0]] = (
                            alias.name if alias.asname else alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seqpar"):
                for alias in node.names:
                    _resolve(node.module, [alias.name])
                    target = f"{node.module}.{alias.name}"
                    if importlib.util.find_spec(node.module) and _is_module(target):
                        aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            chain = _attribute_chain(node) if isinstance(node, ast.Attribute) else None
            if chain and chain[0] in aliases and aliases[chain[0]].startswith("seqpar"):
                module = aliases[chain[0]]
                _resolve(module, chain[1:])


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, re.M))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_name_what_exists(page):
    """`make T`: a Makefile target; `-m M` / `python -m M`: an importable module of this
    repository or an installed one; `seqpar C`: a subcommand of the seqpar command."""
    targets = _make_targets()
    for code in blocks(page, "bash"):
        for line in code.splitlines():
            line = line.split("#")[0]
            for target in re.findall(r"\bmake ([\w-]+)", line):
                assert target in targets, f"{page.name}: make {target}: no such target"
            for module in re.findall(r"-m ([\w.]+)", line):
                assert _is_module(module), f"{page.name}: -m {module}: no such module"
            for command in re.findall(r"^\s*seqpar (\w+)", line):
                assert command in COMMANDS, f"{page.name}: seqpar {command}: no such command"


def test_the_readme_is_a_front_page():
    """What a newcomer needs first, short: the reference material lives in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for heading in ("## Two commands", "## Use it", "## Backends", "## Models", "## Documentation"):
        assert heading in readme, heading
