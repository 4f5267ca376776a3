"""The package's shape: every module imports alone, no private name crosses a module, ruff is clean
(including PLC0415: megalm's own modules are imported at the top of each file)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


def _import_alone(module: str) -> tuple[str, int, str]:
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO)
    return module, r.returncode, r.stderr.strip().splitlines()[-1] if r.returncode else ""


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    # an import cycle shows up only when the cycle's second module is imported first
    modules = _modules()
    assert "megalm.config.validation" in modules and "megalm.training.startup" in modules
    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [(m, err) for m, code, err in pool.map(_import_alone, modules) if code]
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
