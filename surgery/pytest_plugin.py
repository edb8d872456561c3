"""A pytest plugin that checks spec files as tests: one item per spec, failing with the located message.

Off unless configured. In ``pytest.ini`` / ``[tool.pytest.ini_options]``::

    surgery_specs = specs/*.yaml        # globs, relative to the rootdir (one per line)
    surgery_schema_only = false         # true: schema and values only, no torch, no model build

or on the command line: ``--surgery-specs 'specs/*.yaml'`` (repeatable, relative to the
working directory) and ``--surgery-schema-only``. A file the ini globs match is collected when
pytest's walk reaches it (add the spec folder to ``testpaths``), so ``pytest tests/test_x.py``
still runs one module; files the option matches are collected in any case. Each is one item,
``specs/foo.yaml::surgery-spec``. A spec mistake fails the item with the same
lines ``surgery validate`` prints, without a traceback; a spec's warnings become
`SurgerySpecWarning`s (``-W error::surgery.pytest_plugin.SurgerySpecWarning`` fails on them).
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

from .errors import UserError
from .validation import validate

ITEM_NAME = "surgery-spec"
_LOCATION = re.compile(r"^(?P<file>.+?):(?P<line>\d+)(?::\d+)?: ")


class SurgerySpecWarning(UserWarning):
    """A spec setting that is legal but probably unintended (the text says where and why)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("surgery", "surgery spec files as tests")
    group.addoption(
        "--surgery-specs",
        action="append",
        default=[],
        metavar="GLOB",
        help="collect spec files matching GLOB (relative to the working directory; repeatable) "
        "as tests that validate them",
    )
    group.addoption(
        "--surgery-schema-only",
        action="store_true",
        default=False,
        help="check spec files against the schema only: no torch import, no model build",
    )
    parser.addini(
        "surgery_specs",
        type="linelist",
        default=[],
        help="globs of spec files (relative to the rootdir) to collect as tests",
    )
    parser.addini(
        "surgery_schema_only",
        type="bool",
        default=False,
        help="check spec files against the schema only: no torch import, no model build",
    )


def pytest_configure(config: pytest.Config) -> None:
    option_globs, ini_globs = config.getoption("surgery_specs"), config.getini("surgery_specs")
    if not (option_globs or ini_globs):
        return  # not configured: the plugin collects nothing
    from_option = _matches(config, "--surgery-specs", option_globs, config.invocation_params.dir)
    from_ini = _matches(config, "surgery_specs", ini_globs, config.rootpath)
    # files named on the command line are collected even outside the paths pytest walks (its
    # `testpaths`); pytest drops a file it also reaches through a folder argument
    config.args.extend(str(path) for path in sorted(from_option.values()))
    schema_only = bool(config.getoption("surgery_schema_only") or config.getini("surgery_schema_only"))
    config.pluginmanager.register(
        _SpecCollector({**from_ini, **from_option}.keys(), schema_only), "surgery-spec-collector"
    )


def _matches(config: pytest.Config, setting: str, patterns: list[str], base: Path) -> dict[Path, Path]:
    """Resolved path -> path as matched: keyed by the resolved path so that two globs (or a
    symlinked folder) naming one file collect it once."""
    files: dict[Path, Path] = {}
    for pattern in patterns:
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else base / full
        found = [Path(os.path.normpath(p)) for p in glob.glob(str(full), recursive=True) if os.path.isfile(p)]
        if not found:
            config.issue_config_time_warning(
                SurgerySpecWarning(f"{setting}: {pattern!r} matches no file (relative to {base})"), stacklevel=2
            )
        files.update((path.resolve(), path) for path in found)
    return files


class _SpecCollector:
    """Registered only when globs are configured; turns the matching files into `SpecFile`s."""

    def __init__(self, files: Iterable[Path], schema_only: bool) -> None:
        self.files = frozenset(files)
        self.schema_only = schema_only

    def pytest_collect_file(self, file_path: Path, parent: pytest.Collector) -> "SpecFile | None":
        if file_path.resolve() not in self.files:
            return None
        return SpecFile.from_parent(parent, path=file_path, schema_only=self.schema_only)

    def pytest_report_header(self, config: pytest.Config) -> str:
        mode = "schema only" if self.schema_only else "schema and the real model"
        return f"surgery: {len(self.files)} spec file(s) matched, checked against {mode}"


class SpecFile(pytest.File):
    """A spec file: one `SpecItem`."""

    def __init__(self, *, schema_only: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schema_only = schema_only

    def collect(self) -> Iterator["SpecItem"]:
        yield SpecItem.from_parent(self, name=ITEM_NAME)


class SpecItem(pytest.Item):
    """Validates one spec file; fails with the located message of its first mistake."""

    def runtest(self) -> None:
        schema_only = getattr(self.parent, "schema_only", False)
        for text in validate(_shown_path(self.path), against_model=not schema_only):
            match = _LOCATION.match(text)
            # located at the spec line, so pytest's warnings summary points there
            filename, line = (match["file"], int(match["line"])) if match else (str(self.path), 0)
            warnings.warn_explicit(text, SurgerySpecWarning, filename, line)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        # a user mistake (or a warning turned error by -W) is fully said by its message
        if isinstance(excinfo.value, (UserError, SurgerySpecWarning)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"surgery spec {self.path.name}"


def _shown_path(path: Path) -> str:
    """The spec's path as messages show it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
