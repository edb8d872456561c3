"""The manual (docs/, README.md, benchmarks/README.md) against the code it describes.

- every ```yaml block is a spec that validates (or what its marker says it is: see
  docs/architecture.md, "Writing these pages");
- the architecture page names every module of surgery/, and only modules that exist;
- the spec reference covers every key and description of the schema;
- the README keeps the two set-up commands, and .ci/run the same test command;
- `mkdocs build --strict` passes (skipped where mkdocs is not installed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import surgery
from surgery.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([*DOCS.rglob("*.md"), ROOT / "README.md", ROOT / "benchmarks" / "README.md"])
MARKERS = ("fragment", "schema-only", "sweep", "invalid")
# what a fragment is merged onto: the smallest spec that builds offline
MINIMAL = {"model": {"backbone": "torchvision:resnet18", "pretrained": False, "num_classes": 10}}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def named_file(self) -> Path | None:
        """The repository file the block shows, when its first line is `# path/to/file.yaml`."""
        first = self.text.lstrip().splitlines()[0] if self.text.strip() else ""
        m = re.fullmatch(r"#\s*(\S+\.ya?ml)\s*", first)
        return ROOT / m.group(1) if m and (ROOT / m.group(1)).is_file() else None


def yaml_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.fullmatch(r"(\s*)```ya?ml\s*", lines[i])
        if not m:
            i += 1
            continue
        indent, start = m.group(1), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j])
        before = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        mk = re.fullmatch(r"<!--\s*([a-z-]+)\b.*-->", before)
        blocks.append(Block(page, start + 1, body + "\n", mk.group(1) if mk else None))
        i = j + 1
    return blocks


BLOCKS = [b for page in PAGES for b in yaml_blocks(page)]


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_sweep(path: Path) -> None:
    from surgery.sweep import load_sweep

    sweep = load_sweep(path)
    variants = sweep.grid() if sweep.sampler == "grid" else []
    for variant in variants:  # every variant's spec, schema and values (its weights may be a run not made here)
        surgery.load_spec(sweep.spec, [*sweep.set, *variant.overrides])


def test_the_manual_has_yaml_blocks() -> None:
    assert len(BLOCKS) >= 8, [b.where for b in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_yaml_block_validates(block: Block, tmp_path: Path) -> None:
    assert block.marker in (None, *MARKERS), (
        f"{block.where}: unknown marker <!-- {block.marker} -->; use one of {', '.join(MARKERS)}"
    )
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block.where}: a YAML block is a mapping"
    shown = block.named_file
    if shown is not None:
        # the block shows a shipped file: it must hold what the file holds, and the file is checked
        assert data == yaml.safe_load(shown.read_text(encoding="utf-8")), (
            f"{block.where} shows {shown.relative_to(ROOT)} but its content differs from the file"
        )
        if block.marker == "sweep":
            _check_sweep(shown)
        else:  # shipped specs are smoke-run by test_recipes/test_spec; their weights may be a run
            surgery.validate(shown, against_model=False)
        return
    assert block.marker != "sweep", f"{block.where}: a sweep block names its file on its first line (# examples/...)"
    spec = tmp_path / "block.yaml"
    if block.marker == "fragment":
        assert "model" not in data or "backbone" in data["model"], block.where
        spec.write_text(yaml.safe_dump(_merge(MINIMAL, data), sort_keys=False), encoding="utf-8")
    else:
        spec.write_text(block.text, encoding="utf-8")
    if block.marker == "invalid":
        with pytest.raises(UserError):
            surgery.validate(spec)
        return
    try:
        surgery.validate(spec, against_model=block.marker != "schema-only")
    except UserError as exc:
        pytest.fail(f"{block.where}: the block does not validate ({block.marker or 'a complete spec'}):\n{exc}")


def test_a_block_that_differs_from_the_file_it_names_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```yaml\n# examples/quickstart.yaml\nname: not-the-quickstart\n```\n", encoding="utf-8")
    (block,) = yaml_blocks(page)
    assert block.named_file == ROOT / "examples" / "quickstart.yaml"
    assert yaml.safe_load(block.text) != yaml.safe_load(block.named_file.read_text(encoding="utf-8"))


def test_an_invalid_block_is_refused(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- invalid -->\n  ```yaml\n  model: {backbone: torchvision:resnet18}\n"
        "  surgery: [{insert: cbam, at: layr3}]\n  ```\n",
        encoding="utf-8",
    )
    (block,) = yaml_blocks(page)
    assert block.marker == "invalid" and block.line == 4
    spec = tmp_path / "block.yaml"
    spec.write_text(block.text, encoding="utf-8")
    with pytest.raises(UserError, match="layr3"):
        surgery.validate(spec)


# --------------------------------------------------------------------------- architecture
def test_architecture_page_names_every_module() -> None:
    page = (DOCS / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "surgery").rglob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in page]
    assert not missing, f"docs/architecture.md does not name these modules (add a line each): {missing}"
    named = sorted(set(re.findall(r"`(surgery/[\w/]+\.py)`", page)))
    gone = [m for m in named if not (ROOT / m).is_file()]
    assert not gone, f"docs/architecture.md names modules that no longer exist (moved? update the page): {gone}"


# --------------------------------------------------------------------------- spec reference
def _hooks():
    spec = importlib.util.spec_from_file_location("surgery_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _properties(node, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        found.update(node.get("properties", {}))
        for value in node.values():
            _properties(value, found)
    elif isinstance(node, list):
        for value in node:
            _properties(value, found)
    return found


def _descriptions(node, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        if isinstance(node.get("description"), str):
            found.add(node["description"])
        for key, value in node.items():
            if key != "description":
                _descriptions(value, found)
    elif isinstance(node, list):
        for value in node:
            _descriptions(value, found)
    return found


def test_spec_reference_covers_every_key_and_description() -> None:
    hooks = _hooks()
    schema = surgery.schema()
    text = hooks.render_reference(schema)
    paths = re.findall(r"^\| `([^`]+)` \|", text, flags=re.M)
    last = {p.rsplit(".", 1)[-1] for p in paths} | set(re.findall(r"^## (\w+)$", text, flags=re.M))
    missing = sorted(_properties(schema, set()) - last)
    assert not missing, f"keys of schema.json missing from the spec reference: {missing}"
    flat = " ".join(text.split())
    undescribed = [d for d in _descriptions(schema, set()) if hooks._cell(d) not in flat and d not in flat]
    assert not undescribed, f"descriptions of schema.json missing from the spec reference: {undescribed}"
    # the nesting is written out, with types, defaults and allowed values
    row = next(line for line in text.splitlines() if line.startswith("| `train.early_stop.patience` |"))
    assert "integer" in row and "`3`" in row and "&gt;= 1" in row  # shown as ">= 1"
    row = next(line for line in text.splitlines() if line.startswith("| `train.scheduler.name` |"))
    assert '"cosine"' in row and '`"none"`' in row
    assert "| `groups[].unfreeze_at.plateau.monitor` |" in text


def test_spec_reference_page_is_filled_at_build_time() -> None:
    hooks = _hooks()

    class Page:
        class file:
            src_uri = hooks.PAGE

    source = (DOCS / hooks.PAGE).read_text(encoding="utf-8")
    assert hooks.MARKER in source
    out = hooks.on_page_markdown(source, Page, {"config_file_path": str(ROOT / "mkdocs.yml")}, None)
    assert hooks.MARKER not in out and "| `data.augment.erasing.mode` |" in out
    with pytest.raises(ValueError, match="marker"):
        hooks.on_page_markdown("# no marker", Page, {"config_file_path": str(ROOT / "mkdocs.yml")}, None)


# --------------------------------------------------------------------------- README and CI
QUICKSTART = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "surgery run examples/digits-source.yaml examples/quickstart.yaml"
)
TESTS = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pytest -q"


def test_readme_keeps_the_two_setup_commands_and_ci_runs_the_same_tests() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert QUICKSTART in readme and TESTS in readme
    assert len(readme.splitlines()) < 250
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -e '.[test]' && pytest -q" in ci  # TESTS, in CI's own fresh .venv
    assert "mkdocs build --strict" in ci


def test_readme_links_point_at_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links into docs/"
    broken = [t for t in local if not (ROOT / t).exists()]
    assert not broken, f"README.md links to missing files: {broken}"


# --------------------------------------------------------------------------- the site
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs / mkdocs-material not installed: pip install -e '.[docs]'")
    exe = shutil.which("mkdocs")
    cmd = [exe] if exe else [sys.executable, "-m", "mkdocs"]
    result = subprocess.run(
        [*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    spec_page = (tmp_path / "site" / "reference" / "spec" / "index.html").read_text(encoding="utf-8")
    assert "train.early_stop.patience" in spec_page and "<!-- spec-reference -->" not in spec_page
    assert not list((tmp_path / "site").rglob("*.py")), "the site carries Python files"
    assert (tmp_path / "site" / "img" / "quickstart-report.png").is_file()
