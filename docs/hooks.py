"""MkDocs hook: the spec reference page, written from `surgery/spec/schema.json` at build time.

`reference/spec.md` holds an introduction and the marker ``<!-- spec-reference -->``; at build
time the marker is replaced by one table per section of the schema (every key with its type,
default, allowed values and description), so the page cannot drift from the schema that
`surgery validate` checks against. `render_reference(schema)` is the generator; the tests call it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

MARKER = "<!-- spec-reference -->"
PAGE = "reference/spec.md"

# Sections of the page, in the order a spec is usually written; keys of the top level that are
# plain values go in the first table.
_INTRO = {
    "model": "The pretrained backbone, its weights and its classifier head.",
    "surgery": "Operations applied to the backbone in order; each entry is one insert, replace or remove.",
    "groups": "Parameter groups: the first group whose patterns match a parameter owns it.",
    "train": "How the model trains: epochs, optimizer, scheduler, precision, regularisation, stopping.",
    "data": "The dataset, its splits, image size and augmentation.",
    "log": "Trackers besides metrics.jsonl and metrics.csv.",
}


def _resolve(node: Any, root: dict) -> dict:
    """A node with its ``$ref`` followed; the referring node's own keys (its description) win."""
    if not isinstance(node, dict):
        return {}
    seen = 0
    while "$ref" in node and seen < 20:
        target = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        seen += 1
    return node


def _literal(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _type(node: Any, root: dict) -> str:
    node = _resolve(node, root)
    if "const" in node:
        return _literal(node["const"])
    if "enum" in node:
        return " \\| ".join(_literal(v) for v in node["enum"])
    for key in ("oneOf", "anyOf"):
        if key in node:
            return " \\| ".join(dict.fromkeys(_type(alt, root) for alt in node[key]))
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    words = []
    for k in kinds:
        if k == "array":
            inner = _type(node.get("items", {}), root)
            words.append(f"list of ({inner})" if "|" in inner else f"list of {inner}")
        elif k == "object":
            words.append("mapping")
        else:
            words.append(k)
    return " \\| ".join(words) or "any"


def _limits(node: dict) -> list[str]:
    out = []
    for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in node:
            out.append(f"{word} {_literal(node[key])}")
    for key, word in (
        ("minLength", "length >="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
        ("minProperties", "keys >="),
    ):
        if key in node:
            out.append(f"{word} {node[key]}")
    if "pattern" in node:
        out.append(f"matches `{node['pattern']}`")
    return out


def _allowed(node: Any, root: dict) -> str:
    node = _resolve(node, root)
    parts = _limits(node)
    if node.get("type") == "array" or (isinstance(node.get("type"), list) and "array" in node["type"]):
        inner = _limits(_resolve(node.get("items", {}), root))
        parts += [f"each {p}" for p in inner]
    return ", ".join(parts)


def _objects(node: dict, root: dict) -> list[tuple[str, dict]]:
    """The mappings with named keys a value may be: ("", the mapping), ("[]", an item's) or
    (".<KEY>", the value of a key you name)."""
    node = _resolve(node, root)
    found: list[tuple[str, dict]] = []
    if "properties" in node:
        found.append(("", node))
    if "items" in node:
        item = _resolve(node["items"], root)
        if "properties" in item:
            found.append(("[]", item))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and "properties" in _resolve(extra, root):  # a mapping of names you choose
        found.append((".<KEY>", _resolve(extra, root)))
    for key in ("oneOf", "anyOf"):
        for alt in node.get(key, []):
            found += _objects(alt, root)
    return found


def _cell(text: str) -> str:
    """Table-cell text on one line. Outside code spans `|` is escaped and `<`, `>`, `&` become
    entities (a description's `<source>:<name>` is text, not an HTML tag); inside them nothing is
    escaped, since the tables extension already keeps a code span's `|` in its cell."""
    parts = " ".join(str(text).split()).split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = html.escape(parts[i], quote=False).replace("|", "\\|")
    return "`".join(parts)


def _description(node: Any, root: dict, depth: int = 0) -> str:
    """A key's own description followed by those of what it allows, each once: the definition it
    refers to, its alternatives (an unfreeze rule's, a selector's), the values and names of a
    mapping whose keys you choose (a sweep axis, its labels)."""
    raw = node if isinstance(node, dict) else {}
    node = _resolve(node, root)
    found = [node.get("description", "")]
    if "$ref" in raw:
        found.append(_resolve({"$ref": raw["$ref"]}, root).get("description", ""))
    if depth < 4:
        below = [alt for key in ("oneOf", "anyOf") for alt in node.get(key, [])]
        below += [node[key] for key in ("additionalProperties", "propertyNames") if isinstance(node.get(key), dict)]
        found += [_description(sub, root, depth + 1) for sub in below]
    return " ".join(dict.fromkeys(d for d in found if d))


def rows(node: dict, root: dict, prefix: str) -> list[tuple[str, str, str, str, str]]:
    """(key path, type, default, allowed, description) for every key under `node`, depth first."""
    out = []
    for suffix, obj in _objects(node, root):
        required = set(obj.get("required", ()))
        for key, child in obj["properties"].items():
            path = f"{prefix}{suffix}.{key}" if prefix else key
            sub = _resolve(child, root)
            default = _literal(sub["default"]) if "default" in sub else ("required" if key in required else "")
            out.append((path, _type(child, root), default, _allowed(child, root), _description(child, root)))
            out += rows(child, root, path)
    return out


def _table(items: list[tuple[str, str, str, str, str]]) -> str:
    lines = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for path, kind, default, allowed, text in items:
        shown = f"`{default}`" if default and default != "required" else default
        lines.append(f"| `{path}` | {kind} | {_cell(shown)} | {_cell(allowed)} | {_cell(text)} |")
    return "\n".join(lines)


def render_reference(schema: dict) -> str:
    """The reference as Markdown: the top-level values, then one section per top-level mapping."""
    top = schema["properties"]
    plain = {k: v for k, v in top.items() if k not in _INTRO}
    out = [
        "## Top level",
        "",
        _cell(schema.get("description", "")),
        "",
        _table(rows({"properties": plain, "required": schema.get("required", [])}, schema, "")),
        "",
    ]
    for key, intro in _INTRO.items():
        if key not in top:
            continue
        node = _resolve(top[key], schema)
        kind = _type(top[key], schema)
        default = (
            _literal(node["default"])
            if "default" in node
            else ("required" if key in schema.get("required", ()) else "")
        )
        out += [
            f"## {key}",
            "",
            _cell(node.get("description", intro)),
            "",
            f"`{key}`: {kind}"
            + (
                f", default `{default}`"
                if default and default != "required"
                else ", required"
                if default == "required"
                else ""
            ),
            "",
        ]
        below = rows(top[key], schema, key)
        if below:
            out += [_table(below), ""]
    sweep = schema.get("$defs", {}).get("sweep_file")
    if sweep:  # the other file `surgery validate` takes (`surgery schema --sweep` prints its schema)
        out += [
            "## Sweep files",
            "",
            _cell(sweep.get("description", "")),
            "",
            "A sweep file's keys (see [Sweeps](../sweeps.md)); `spec` and `set` hold spec keys, as above.",
            "",
            _table(rows(sweep, schema, "")),
            "",
        ]
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its {MARKER} marker: the spec reference has nowhere to go")
    # the schema of this checkout (beside mkdocs.yml), whichever `surgery` is installed
    path = Path(config["config_file_path"]).parent / "surgery" / "spec" / "schema.json"
    return markdown.replace(MARKER, render_reference(json.loads(path.read_text(encoding="utf-8"))))
