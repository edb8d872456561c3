"""The pytest plugin: spec files as test items, located failures without tracebacks, off unless configured."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import pytest
import tomllib
import yaml

pytest_plugins = ["pytester"]

# `-p no:surgery` keeps an installed entry point from registering the module a second time
PLUGIN = ("-p", "no:surgery", "-p", "surgery.pytest_plugin")

GOOD = """\
model:
  backbone: torchvision:resnet18
  pretrained: false
  num_classes: 10
surgery:
  - insert: se
    at: layer4
data:
  image_size: 32
"""

MISSPELT = GOOD.replace("num_classes: 10", "num_clases: 10")  # line 4
LAYER9 = GOOD.replace("at: layer4", "at: layer9")  # a real-model mistake: resnet18 has layer1..layer4
FROZEN_ALL_RUN = (
    GOOD
    + """\
groups:
  - name: rest
    params: '*'
    unfreeze_at: 5
train:
  epochs: 2
"""
)


@pytest.fixture(scope="module")
def model_imports() -> None:
    """Import what a model build imports, once, in this process: an in-process pytester run drops
    the modules it imported when it ends, and torch cannot import some of them a second time."""
    import surgery

    surgery.validate(yaml.safe_load(GOOD))


def write(pytester: pytest.Pytester, **specs: str) -> None:
    for name, text in specs.items():
        path = pytester.path / "specs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)


def test_good_spec_passes_against_the_model(pytester: pytest.Pytester, model_imports: None) -> None:
    write(pytester, good=GOOD)
    result = pytester.runpytest(*PLUGIN, "--surgery-specs", "specs/*.yaml", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*specs/good.yaml::surgery-spec PASSED*"])


def test_misspelt_key_fails_with_the_located_message_and_no_traceback(pytester: pytest.Pytester) -> None:
    write(pytester, bad=MISSPELT)
    result = pytester.runpytest(*PLUGIN, "--surgery-specs", "specs/*.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*specs/bad.yaml:4:3: model.num_clases: unknown key 'num_clases'",
            "*found:*'num_clases'",
            "*expected:*",
            "*hint:*did you mean 'num_classes'?",
            "FAILED specs/bad.yaml::surgery-spec*",
        ]
    )
    out = result.stdout.str()
    assert "Traceback" not in out and "pytest_plugin.py" not in out


def test_schema_only_passes_what_only_the_model_rejects(pytester: pytest.Pytester, model_imports: None) -> None:
    write(pytester, layer9=LAYER9)
    result = pytester.runpytest(*PLUGIN, "--surgery-specs", "specs/*.yaml", "--surgery-schema-only")
    result.assert_outcomes(passed=1)

    result = pytester.runpytest(*PLUGIN, "--surgery-specs", "specs/*.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "specs/layer9.yaml:7:5: surgery?0].at: no module of torchvision:resnet18 matches 'layer9'",
            "*hint:*did you mean 'layer4'*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_inactive_without_configuration(pytester: pytest.Pytester) -> None:
    write(pytester, bad=MISSPELT)
    result = pytester.runpytest(*PLUGIN)
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert "surgery-spec" not in result.stdout.str()


def test_ini_globs_collect_each_file_once_with_a_readable_nodeid(pytester: pytest.Pytester) -> None:
    write(pytester, a=GOOD, b=MISSPELT)
    (pytester.path / "ci.yaml").write_text("not: a spec\n")  # a YAML file no glob names
    pytester.makeini("""
        [pytest]
        surgery_specs =
            specs/*.yaml
            specs/a.yaml
            **/a.y*ml
        surgery_schema_only = true
    """)
    result = pytester.runpytest(*PLUGIN, "--surgery-specs", "specs/a.yaml", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["specs/a.yaml::surgery-spec", "specs/b.yaml::surgery-spec", "2 tests collected*"])
    assert "ci.yaml" not in result.stdout.str()


def test_a_glob_that_matches_nothing_is_a_warning(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*PLUGIN, "--surgery-specs", "spces/*.yaml")
    result.stdout.fnmatch_lines(["*SurgerySpecWarning: --surgery-specs: 'spces/*.yaml' matches no file*"])


def test_spec_warnings_are_pytest_warnings_located_at_the_spec(pytester: pytest.Pytester) -> None:
    write(pytester, frozen=FROZEN_ALL_RUN)
    result = pytester.runpytest(*PLUGIN, "--surgery-specs", "specs/*.yaml", "--surgery-schema-only")
    result.assert_outcomes(
        passed=1
    )  # no warnings count: with the entry point installed, `-p` adds an already-imported warning
    result.stdout.fnmatch_lines(
        [
            "*specs/frozen.yaml:13: SurgerySpecWarning: specs/frozen.yaml:13: "
            "groups?0].unfreeze_at: group 'rest' unfreezes at epoch 5*",
            "*specs/frozen.yaml:10: SurgerySpecWarning: *no group trains*",
        ]
    )

    result = pytester.runpytest(
        *PLUGIN,
        "--surgery-specs",
        "specs/*.yaml",
        "--surgery-schema-only",
        "-W",
        "error::surgery.pytest_plugin.SurgerySpecWarning",
    )
    result.assert_outcomes(failed=1)
    assert "Traceback" not in result.stdout.str()


def test_other_exceptions_keep_the_normal_traceback(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> tuple[str, ...]:
        raise RuntimeError("a bug, not a spec mistake")

    # the module the inner run will use: an earlier in-process run may have left a stale
    # `surgery.pytest_plugin` attribute on the package, which a dotted-string setattr would patch
    monkeypatch.setattr(import_module("surgery.pytest_plugin"), "validate", broken)
    write(pytester, good=GOOD)
    result = pytester.runpytest(*PLUGIN, "--surgery-specs", "specs/*.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*def runtest*", "E * RuntimeError: a bug, not a spec mistake"])


def test_schema_only_never_imports_torch(pytester: pytest.Pytester) -> None:
    write(pytester, good=GOOD)
    pytester.makeconftest("""
        import sys

        def pytest_terminal_summary(terminalreporter):
            terminalreporter.write_line(f"torch imported: {'torch' in sys.modules}")
    """)
    result = pytester.runpytest_subprocess(*PLUGIN, "--surgery-specs", "specs/*.yaml", "--surgery-schema-only")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["torch imported: False"])


def test_entry_point_names_the_plugin_module() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    module = import_module(pyproject["project"]["entry-points"]["pytest11"]["surgery"])
    assert hasattr(module, "pytest_addoption") and hasattr(module, "SurgerySpecWarning")


def test_the_option_collects_specs_outside_testpaths(pytester: pytest.Pytester) -> None:
    write(pytester, a=GOOD)
    pytester.makepyfile(test_other="def test_other(): pass")
    pytester.makeini("[pytest]\ntestpaths = test_other.py\n")
    result = pytester.runpytest(*PLUGIN, "--surgery-specs", "specs/*.yaml", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["test_other.py::test_other", "specs/a.yaml::surgery-spec", "2 tests collected*"])

    result = pytester.runpytest(*PLUGIN, "specs", "--surgery-specs", "specs/*.yaml", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["specs/a.yaml::surgery-spec", "1 test collected*"])
