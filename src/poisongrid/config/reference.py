"""The configuration reference (docs/reference/config.md), generated from the JSON schema every
config is validated against, so the documentation cannot drift from what is accepted:

    python -m poisongrid.config.reference > docs/reference/config.md

Detectors' and remedies' own parameters are declared by each plug-in class (`params`) and listed
after the schema's keys."""
from __future__ import annotations

import json
import sys

from .load import SCHEMA

HEADER = """# Configuration reference

Every key a grid's config may hold, generated from the schema it is validated against
(`src/poisongrid/schemas/config.schema.json`; regenerate this page with
`python -m poisongrid.config.reference > docs/reference/config.md`). `<name>` stands for a
name you choose (a dataset, detector, defense, defender model or bona fide set). A key left out
takes its default; *required* keys have none. How the pieces fit together is in
[Configuration](../configuration.md).
"""


def _resolve(node: dict) -> dict:
    ref = node.get("$ref")
    if ref:
        return SCHEMA["$defs"][ref.split("/")[-1]]
    return node


def _types(node: dict) -> str:
    if "enum" in node:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    t = node.get("type")
    if t is None:
        alts = node.get("oneOf") or node.get("anyOf")
        if alts:
            return " or ".join(_types(_resolve(a)) for a in alts)
        return "any"
    ts = t if isinstance(t, list) else [t]
    out = []
    for one in ts:
        if one == "array":
            items = node.get("items")
            out.append(f"list of {_types(_resolve(items))}" if isinstance(items, dict) else "list")
        elif one == "object":
            out.append("mapping")
        else:
            out.append(one)
    return " or ".join(out)


def _bounds(node: dict) -> str:
    parts = []
    for key, text in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in node and not isinstance(node[key], bool):
            parts.append(f"{text} {node[key]}")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rows(node: dict, path: str, required: set[str], out: list[str], seen: tuple = ()) -> None:
    node = _resolve(node)
    props = node.get("properties") or {}
    for name, child in props.items():
        sub = _resolve(child)
        key = f"{path}.{name}" if path else name
        default = "*required*" if name in required else (f"`{json.dumps(sub['default'])}`" if "default" in sub else "")
        desc = sub.get("description") or child.get("description") or ""
        bounds = _bounds(sub)
        out.append(f"| `{key}` | {_cell(_types(sub))}{' (' + bounds + ')' if bounds else ''} | {_cell(default)} | {_cell(desc)} |")
        _children(sub, key, out, seen)


def _children(node: dict, key: str, out: list[str], seen: tuple) -> None:
    if node.get("properties"):
        _rows(node, key, set(node.get("required") or ()), out, seen)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        ref = extra.get("$ref")
        if ref in seen:
            return
        _rows(extra, f"{key}.<name>", set(_resolve(extra).get("required") or ()), out, seen + ((ref,) if ref else ()))


def plugin_params() -> list[str]:
    """Each detector type's and remedy's own parameters with their defaults."""
    from ..detectors import DETECTORS
    from ..remedies import REMEDIES

    out = []
    for title, reg, key in (("Detector types", DETECTORS, "detectors.<name>.type"), ("Remedies", REMEDIES, "defenses.<name>.remedy")):
        out += ["", f"## {title}", "", f"The value of `{key}` and the further keys it takes (with their defaults):", "",
                "| name | parameters |", "|---|---|"]
        for name in reg.names(plugins=False):
            params = getattr(reg.get(name), "params", {}) or {}
            text = ", ".join(f"`{k}`: `{json.dumps(v)}`" for k, v in params.items()) or "–"
            out.append(f"| `{name}` | {_cell(text)} |")
    return out


def render() -> str:
    out = [HEADER, "## Keys", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    _rows(SCHEMA, "", set(SCHEMA.get("required") or ()), out)
    out += plugin_params()
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
