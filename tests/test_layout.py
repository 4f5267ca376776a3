"""The package's shape: every module imports alone, no private name crosses a module, ruff is clean
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


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


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


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff comes with megalm[dev]")
def test_ruff_is_clean():
    r = subprocess.run(["ruff", "check", "megalm", "tests", "tools", "setup.py"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:]
