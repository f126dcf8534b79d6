"""The config reference: every key with its default and meaning, as the README's Markdown tables."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

import yaml

from .schema import RunConfig, plain


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass, read from source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference_markdown() -> str:
    """Every config key with its default and meaning, as Markdown tables (the README's reference)."""
    lines = []
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        cls = type(getattr(defaults, section.name))
        lines += [f"**`{section.name}`**: {cls.__doc__.strip().splitlines()[0]}", "",
                  "| key | default | meaning |", "|---|---|---|"]
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            value = plain(getattr(getattr(defaults, section.name), f.name))
            lines.append(f"| `{section.name}.{f.name}` | `{json_like(value)}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def json_like(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").removesuffix(" ...")
