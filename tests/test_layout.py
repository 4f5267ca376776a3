"""The package's shape: every module imports alone, top-level imports form no cycle, no private name
crosses a module, ruff is clean
(including PLC0415: megalm's own modules are imported at the top of each file)."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import megalm

PACKAGE = Path(megalm.__file__).parent
REPO = PACKAGE.parent


def _module_paths() -> dict[str, Path]:
    paths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return paths


def _modules() -> list[str]:
    return list(_module_paths())


# Run in a fresh interpreter: the libraries megalm uses are imported once, then each megalm module is
# imported in a child forked from that state (its own copy of sys.modules, no megalm module in it).
IMPORT_EACH_ALONE = """
import importlib, json, multiprocessing, sys
import deepspeed, torch, transformers  # the slow imports, shared by every child
assert not [m for m in sys.modules if m.split(".")[0] == "megalm"], "a library imported megalm"

def import_alone(module):
    try:
        importlib.import_module(module)
        return module, ""
    except BaseException as e:  # noqa: BLE001 - reported to the test
        return module, f"{type(e).__name__}: {e}"

if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
        print(json.dumps(dict(pool.map(import_alone, json.loads(sys.argv[1]), chunksize=1))))
"""


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    # an import cycle shows up only when the cycle's second module is imported first
    modules = _modules()
    assert "megalm.config.validation" in modules and "megalm.training.startup" in modules
    r = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, json.dumps(modules)], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    errors = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted(modules)
    failed = {m: err for m, err in errors.items() if err}
    assert not failed, failed


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "tools").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megalm"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.endswith("__")]
    assert not offenders, offenders


def test_ruff_is_clean():
    assert shutil.which("ruff"), "ruff is missing: it comes with megalm[dev] (pip install -e '.[dev]')"
    r = subprocess.run(["ruff", "check", "megalm", "tests", "tools", "setup.py"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:]


def _top_level_imports() -> dict[str, set[str]]:
    """module -> the megalm modules its top-level statements import (function-level imports, for
    heavy or optional packages, are not edges: they run after every module has loaded)."""
    paths = _module_paths()
    graph = {}
    for module, path in paths.items():
        edges = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megalm"):
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("megalm")}
        graph[module] = edges & set(paths)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_top_level_imports_form_no_cycle():
    graph = _top_level_imports()
    assert "megalm.training.startup" in graph["megalm.training.loop"]  # the graph sees real edges
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    graph["megalm.config.schema"].add("megalm.training.loop")  # a planted upward import is found
    assert _cycle(graph) is not None
