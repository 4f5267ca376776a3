"""The config reference: every key's type, default and documentation, read from the schema.

Each field's documentation is the string literal that follows it in megalm/config/schema.py.
`describe_markdown()` is docs/config.md (tests/test_config.py fails when that file is stale).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Literal

from megalm.config.loading import field_types, type_name
from megalm.config.schema import SECTIONS


def describe() -> dict[str, dict[str, str]]:
    """Every key's documentation, read from the string literal after each field."""
    out: dict[str, dict[str, str]] = {}
    for name, cls in SECTIONS.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        docs: dict[str, str] = {}
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
        out[name] = docs
    return out


def describe_markdown() -> str:
    """docs/config.md: every section and key with its type, default and documentation."""
    lines = ["# Configuration reference", "",
             "Generated from megalm/config/schema.py by `python -m megalm.train --help-config --markdown`;",
             "tests/test_config.py fails when it is out of date. Derived defaults are resolved by",
             "`Config.validate(world_size)` and written into RUN_DIR/config.yaml.", ""]
    docs = describe()
    for name, cls in SECTIONS.items():
        lines += [f"## {name}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        types_ = field_types(cls)
        for f in dataclasses.fields(cls):
            tp = types_[f.name]
            if typing.get_origin(tp) is Literal:
                shown = "one of " + ", ".join(map(repr, typing.get_args(tp)))
            else:
                shown = type_name(tp).replace("|", "or")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            default = "derived" if default is None else repr(default)
            lines.append(f"| `{name}.{f.name}` | {shown} | {default} | {docs[name].get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)
