"""The package's shape: no import circle (function-level and type-checking imports included), no function
of 80 lines or more, and a root that holds its entry modules and a few foundations, everything else in
subpackages."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "surgery"
ROOT_MODULES = {"__init__", "__main__", "cli", "validation", "pytest_plugin", "errors", "files", "untrusted"}


def _graph() -> dict[str, set[str]]:
    modules: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                deps.add(".".join(base + ([node.module] if node.module else [])))
        modules[name] = deps
    return {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    found, seen = [], set()

    def walk(module: str, stack: list[str]) -> None:
        if module in stack:
            found.append(" -> ".join(stack[stack.index(module) :] + [module]))
            return
        if module in seen:
            return
        seen.add(module)
        for dep in sorted(graph[module]):
            walk(dep, stack + [module])

    for module in sorted(graph):
        walk(module, [])
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]


def test_the_package_root_holds_entry_modules_and_subpackages() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == ROOT_MODULES, "a new module belongs in the subpackage that says what it holds"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {
        "spec",
        "model",
        "data",
        "train",
        "runs",
        "evaluate",
        "explain",
        "deploy",
        "pages",
        "sweep",
        "average",
    }


def test_every_function_reads_in_one_screen() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 79:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert long == [], "split these into phases (helpers with names that say what they do)"
