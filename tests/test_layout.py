"""The layout stays readable: no import cycle between aecore's modules (function-level
imports included, so none can hide one), modules stay small, and nothing points at
files outside the repository."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as
PACKAGES = {"aecore": "aecore", "plugins": "aecore_plugins", "benchmarks": "aecore_benchmarks"}
MAX_LINES = 410


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every first-party Python file."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """First-party modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 100  # the scan sees the imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_stay_small(name):
    lines = len(_modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by concern"


def test_nothing_points_outside_the_repository():
    texts = [ROOT / "README.md", *ROOT.glob("docs/*.md")]
    texts += [p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")]
    outside = "/".join(("..", "shared"))  # the development machine's folder beside the repo
    for path in texts:
        assert outside not in path.read_text(encoding="utf-8"), path
    assert (ROOT / "docs" / "ARCHITECTURE.md").is_file()
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ("aecore.demo", "aecore.config", ["DemoRecipe"]),
        ("aecore.onnx_export", "aecore.onnx", ["register_export_decomposition", "export_onnx"]),
    ],
)
def test_old_module_names_still_import_with_a_deprecation_warning(old, new, names):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated"):
        module = importlib.import_module(old)
    for name in names:
        assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_kernel_checks_build_their_messages_without_iostreams():
    # TORCH_CHECK formats its parts through an ostringstream compiled into the extension;
    # on a GPU machine a number formatted that way crashed the process instead of
    # raising. AECORE_CHECK builds the message with std::to_string.
    sources = [
        p
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in {".h", ".cpp", ".cu", ".cuh"} and p.name != "check_message.h"
    ]
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sources
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "TORCH_CHECK(" in line or "c10::str(" in line
    ]
    assert sources and not offenders, offenders
