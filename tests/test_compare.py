"""`surgery compare`: finished runs side by side, seeds of one variant as mean ± std, the page in a
real browser, and clear refusals of folders that are not finished runs."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from browser import assert_not_blank, keep_screenshot, page_text, render
from scipy.stats import binomtest

from surgery.cli import main
from surgery.errors import UsageError
from surgery.pages.compare import (
    aggregate,
    collect,
    read_run,
    shared_name,
    spec_difference,
    to_json,
    to_markdown,
    write_html,
)
from surgery.runs import read_metrics

WEIGHTS = shutil.ignore_patterns("*.safetensors", "*.pt")  # compare reads none of them


def _variant_of(
    tiny_run: Path,
    folder: Path,
    *,
    name: str,
    seed: int,
    best: float,
    final: float,
    at: str | None = None,
    multi_label: bool = False,
) -> Path:
    """A copy of the shared run, as if trained with another seed (or another surgery target):
    its spec.yaml and the summary's figures changed, everything else as the run wrote it."""
    run = Path(shutil.copytree(tiny_run, folder / name, ignore=WEIGHTS))
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    spec.update(name=name, seed=seed)
    if at is not None:
        spec["surgery"][0]["at"] = at
    (run / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    summary = json.loads((run / "summary.json").read_text())
    summary.update(name=name, best_val_acc=best, final_val_acc=final)
    if multi_label:
        summary.update(multi_label=True, best_val_map=best, final_val_map=final)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def runs(tiny_run: Path, tmp_path: Path) -> dict[str, Path]:
    """Two seeds of CBAM after layer3+layer4, one seed of CBAM after layer4 only."""
    return {
        "s0": _variant_of(tiny_run, tmp_path, name="cbam34-s0", seed=0, best=0.61, final=0.60),
        "s1": _variant_of(tiny_run, tmp_path, name="cbam34-s1", seed=1, best=0.65, final=0.62),
        "l4": _variant_of(tiny_run, tmp_path, name="cbam4-s0", seed=0, best=0.70, final=0.69, at="layer4"),
    }


def test_collect_reads_each_runs_figures(tiny_run: Path) -> None:
    row = read_run(tiny_run)
    summary = json.loads((tiny_run / "summary.json").read_text())
    metrics = read_metrics(tiny_run / "metrics.jsonl")
    assert (row.name, row.metric, row.best, row.final, row.best_epoch) == (
        summary["name"],
        "val_acc",
        summary["best_val_acc"],
        summary["final_val_acc"],
        summary["best_epoch"],
    )
    assert (row.params_inserted, row.params_total) == (summary["params"]["inserted"], summary["params"]["total"])
    assert row.images_per_sec == statistics.median(m["images_per_sec"] for m in metrics)
    assert row.val_curve == tuple(m["val_acc"] for m in metrics) and row.wall_seconds == summary["wall_seconds"]
    assert "seed" not in row.spec and "name" not in row.spec


def test_seeds_of_one_variant_are_averaged_best_first(runs: dict[str, Path]) -> None:
    variants = aggregate(collect([runs["s0"], runs["l4"], runs["s1"]]))
    assert [v.label for v in variants] == ["cbam4-s0", "cbam34"]  # sorted by mean best; shared name part
    seeds = variants[1]
    bests = [read_run(runs[k]).best for k in ("s0", "s1")]
    assert [r.run_dir for r in seeds.runs] == [runs["s0"], runs["s1"]]
    assert seeds.best.mean == pytest.approx(statistics.fmean(bests)) and seeds.best.std == pytest.approx(
        statistics.stdev(bests)
    )
    assert seeds.best.format() == f"{statistics.fmean(bests):.4f} ± {statistics.stdev(bests):.4f}"
    assert variants[0].best.std is None and variants[0].best.format() == f"{read_run(runs['l4']).best:.4f}"


def test_runs_with_one_name_are_told_apart_by_their_spec(tiny_run: Path, tmp_path: Path) -> None:
    a = _variant_of(tiny_run, tmp_path, name="a", seed=0, best=0.5, final=0.5)
    b = _variant_of(tiny_run, tmp_path, name="b", seed=1, best=0.6, final=0.6, at="layer4")
    for run in (a, b):  # both runs named quickstart, as `surgery run quickstart.yaml --set ...` leaves them
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "name": "quickstart"}))
    labels = [v.label for v in aggregate(collect([a, b]))]
    assert labels == ["quickstart (surgery[0].at=layer4)", "quickstart"]
    assert [v.label for v in aggregate(collect([a, b]), labels={a: "mine", str(b): "mine"})] == ["mine"]


@pytest.mark.parametrize(
    "names, label",
    [
        (["cbam-s0", "cbam-s1"], "cbam"),
        (["cbam-layer3-seed0", "cbam-layer3-seed1", "cbam-layer3-seed2"], "cbam-layer3"),
        (["quickstart", "quickstart"], "quickstart"),
        (["run0", "run1"], "run"),
        (["cbam", "cbam-2"], "cbam"),
        (["alpha", "beta"], "alpha / beta"),
    ],
)
def test_shared_name(names: list[str], label: str) -> None:
    assert shared_name(names) == label


def test_spec_difference_names_what_differs() -> None:
    a = {"train": {"epochs": 4, "lr": 0.1}, "surgery": [{"at": "layer4"}]}
    b = {"train": {"epochs": 8, "lr": 0.1}, "surgery": [{"at": "layer3"}], "extra": 1}
    assert spec_difference(a, b) == "train.epochs=4, surgery[0].at=layer4 +1 more"
    assert spec_difference(a, a) == ""


def test_markdown_and_json(runs: dict[str, Path]) -> None:
    variants = aggregate(collect(runs.values()))
    lines = to_markdown(variants).splitlines()
    assert lines[0].startswith("| variant | runs | best val acc | final val acc |") and len(lines) == 2 + len(variants)
    assert lines[2].startswith("| cbam4-s0 | 1 | ") and "| cbam34 | 2 | " in lines[3] and " ± " in lines[3]
    data = json.loads(to_json(variants))
    assert [v["label"] for v in data["variants"]] == [v.label for v in variants]
    assert data["variants"][1]["best"]["std"] == pytest.approx(variants[1].best.std)
    assert [r["run_dir"] for r in data["variants"][1]["runs"]] == [str(runs["s0"]), str(runs["s1"])]


def test_compare_command_writes_the_page(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "pages" / "compare.html"
    assert main(["compare", *map(str, runs.values()), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert [v["label"] for v in json.loads(captured.out)["variants"]] == ["cbam4-s0", "cbam34"]
    assert f"wrote {out}" in captured.err
    html = out.read_text()
    text, tags = page_text(html)
    assert "script" not in tags and all(src.startswith("data:image/png") for src in html.split('src="')[1:])
    assert "3 runs, 2 variants" in text and "Best: cbam4-s0" in text
    assert f'href="../{runs["s0"].name}/report.html"' in html  # each run's own page, linked relatively
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p, runs: p / "nowhere", "the run directory does not exist"),
        (lambda p, runs: (p / "empty").mkdir() or p / "empty", "the folder is not a run directory"),
        (
            lambda p, runs: (runs["s1"] / "summary.json").unlink() or runs["s1"],
            "the run has not finished: it has no summary.json",
        ),
        (
            lambda p, runs: (runs["s1"] / "summary.json").write_text("{") and runs["s1"],
            "summary.json cannot be read: JSONDecodeError",
        ),
        (lambda p, runs: runs["s0"], "a run directory is given twice"),
        (
            lambda p, runs: (runs["s1"] / "summary.json").write_text("[" * 100_000) and runs["s1"],
            "summary.json cannot be read: nested too deeply",
        ),
        (
            lambda p, runs: (runs["s1"] / "summary.json").write_bytes(b'{"name": "\xff"}') and runs["s1"],
            "summary.json cannot be read: UnicodeDecodeError",
        ),
        (
            lambda p, runs: (runs["s1"] / "metrics.jsonl").write_bytes(b'{"epoch": "\xff"}\n') and runs["s1"],
            "metrics.jsonl cannot be read: UnicodeDecodeError",
        ),
    ],
)
def test_compare_refuses_what_is_not_a_finished_run(
    runs: dict[str, Path], tmp_path: Path, capsys, make, message
) -> None:
    bad = make(tmp_path, runs)
    out = tmp_path / "compare.html"
    assert main(["compare", str(runs["s0"]), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and str(bad) in err
    assert not out.exists()


def test_several_bad_folders_are_named_together(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="2 of the 3 folders are not finished runs") as caught:
        collect([runs["s0"], tmp_path / "a", tmp_path / "b"])
    assert str(tmp_path / "a") in caught.value.found and str(tmp_path / "b") in caught.value.found
    assert [r.run_dir for r in collect([runs["s0"], tmp_path / "a"], skip_unfinished=True)] == [runs["s0"]]


def test_every_kind_of_refused_folder_is_named_in_one_error(runs: dict[str, Path], tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["s1"], unfinished)
    (unfinished / "summary.json").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as caught:
        collect([runs["s0"], tmp_path / "nowhere", tmp_path / "empty", unfinished, runs["s0"]])
    assert caught.value.problem == (
        "4 of the 5 folders cannot be compared: 1 does not exist, 1 is not a run "
        "directory, 1 has not finished, 1 is given twice"
    )
    for folder in ("nowhere", "empty", "unfinished"):
        assert str(tmp_path / folder) in caught.value.found


def test_single_and_multi_label_runs_are_not_mixed(tiny_run: Path, tmp_path: Path, runs: dict[str, Path]) -> None:
    multi = _variant_of(tiny_run, tmp_path, name="multi", seed=0, best=0.4, final=0.4, multi_label=True)
    with pytest.raises(UsageError, match="single-label and multi-label runs cannot be compared"):
        collect([runs["s0"], multi])


def test_compare_page_renders_in_chromium(runs: dict[str, Path], tmp_path: Path) -> None:
    page = write_html(tmp_path / "compare.html", aggregate(collect(runs.values())))
    shown = render(page, tmp_path, height=1400)
    variants = aggregate(collect(runs.values()))
    for v in variants:
        assert f"{v.label} {len(v.runs)} {v.best.format()} {v.final.format()}" in shown.text
    for run in runs.values():
        assert run.name in shown.text
    assert "Validation curves" in shown.text and "img" in shown.tags
    assert_not_blank(shown.screenshot)
    keep_screenshot(shown.screenshot, "compare.png")


def test_report_and_compare_do_not_import_torch(runs: dict[str, Path], tmp_path: Path) -> None:
    """Both only read JSON, YAML and PNG files: they answer without torch's seconds of import."""
    code = (
        f"from surgery.cli import main\nassert main(['report', {str(runs['s0'])!r}]) == 0\n"
        f"assert main(['compare', {str(runs['s0'])!r}, {str(runs['s1'])!r}, '--markdown', "
        f"'--out', {str(tmp_path / 'c.html')!r}]) == 0\n"
        "import sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent
    )
    assert proc.returncode == 0, proc.stderr
    assert "| cbam34 | 2 |" in proc.stdout and (tmp_path / "c.html").is_file()


@pytest.mark.parametrize(
    "folder, link",
    [
        ("javascript:alert(1)", "./javascript%3Aalert%281%29/report.html"),
        ("a b#c?d", "./a%20b%23c%3Fd/report.html"),
        ("%2e%2e", "./%252e%252e/report.html"),
    ],
)
def test_run_folders_are_linked_as_folders_never_as_urls(
    tiny_run: Path, tmp_path: Path, folder: str, link: str
) -> None:
    """A folder named like a URL scheme, a fragment, a query or an encoded '..' is linked as the
    folder it is: './'-prefixed and percent-encoded, on the compare page and a sweep's comparison."""
    run = _variant_of(tiny_run, tmp_path, name=folder, seed=0, best=0.5, final=0.5)
    (run / "report.html").write_text("<p>run</p>")
    html = write_html(tmp_path / "compare.html", aggregate(collect([run]))).read_text()
    links = re.findall(r'href="([^"]*)"', html)
    assert links == [link]
    assert (tmp_path / unquote(link)).resolve() == (run / "report.html").resolve()


def test_every_link_in_the_templates_goes_through_the_href_filter() -> None:
    """One helper for every page: a template that writes href="{{ x }}" without it fails here."""
    folder = Path(__file__).resolve().parent.parent / "surgery" / "pages" / "templates"
    for template in folder.glob("*.j2"):
        for value in re.findall(r'href="(\{\{[^"]*)"', template.read_text()):
            assert re.fullmatch(r"\{\{ [^|}]+ \| href \}\}", value), f"{template.name}: href={value}"


@pytest.mark.parametrize("form", [[], ["--markdown"]])
def test_run_names_and_folders_reach_the_terminal_as_text(
    tiny_run: Path, tmp_path: Path, capsys, monkeypatch, form: list[str]
) -> None:
    """A run named with rich markup and a terminal escape, and a folder that is no run: printed as
    the text they are, in the table, the Markdown and the error message."""
    monkeypatch.setenv("COLUMNS", "300")
    run = _variant_of(tiny_run, tmp_path, name="[bold]x\x1b[2J", seed=0, best=0.5, final=0.5)
    assert main(["compare", str(run), *form]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "[bold]x\\x1b[2J" in out
    assert main(["compare", str(run), str(tmp_path / "gone\x1b]0;pwned\x07")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "gone\\x1b]0;pwned\\x07" in err


def test_identical_curves_of_different_variants_all_show(runs: dict[str, Path]) -> None:
    """The fixture's runs are copies of one run: every variant has the same curve. Each still shows,
    with its own marker and points of its own, and the legend names each one."""
    from surgery.pages.compare import curves_figure

    variants = aggregate(collect(runs.values()))
    fig = curves_figure(variants)
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label() and not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["cbam4-s0", "cbam34 (2 runs)"]
    assert len({line.get_marker() for line in lines}) == len(lines)
    points = [{(round(x, 6), y) for x, y in zip(line.get_xdata(), line.get_ydata())} for line in lines]
    assert not points[0] & points[1]
    assert "identical points moved sideways" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cbam4-s0", "cbam34 (2 runs)"]


def test_the_runs_table_fits_1280_px_in_chromium(tiny_run: Path, tmp_path: Path) -> None:
    """Long run names and deep folders: the page is no wider than the window (long cells end in an
    ellipsis with the full text in their title, a table that still overflows scrolls in its own box)."""
    deep = tmp_path / ("a-very-long-folder-name-" * 4) / ("and-deeper-" * 5)
    deep.mkdir(parents=True)
    rows = [
        _variant_of(
            tiny_run,
            deep,
            name=f"resnet50-cbam-layer3-layer4-lr{k}-wd0.05-mixup0.2-seed{k}",
            seed=k,
            best=0.5 + k / 100,
            final=0.5,
            at="layer4" if k else None,
        )
        for k in range(3)
    ]
    page = write_html(tmp_path / "compare.html", aggregate(collect(rows)))
    html = page.read_text()
    probe = tmp_path / "probe.html"  # the page itself has no script; a copy measures its width
    probe.write_text(
        html.replace(
            "</body>",
            "<script>document.body.insertAdjacentHTML('beforeend', "
            "'<p id=width>' + document.documentElement.scrollWidth + '</p>')</script></body>",
        )
    )
    shown = render(probe, tmp_path, width=1280, height=1400)
    width = int(re.search(r'<p id="width">(\d+)</p>', shown.dom).group(1))
    assert width <= 1280, f"the page is {width} px wide"
    assert f'title="{rows[0]}"' in html  # the full folder, where the cell shows an ellipsis
    keep_screenshot(shown.screenshot, "compare-1280.png")


# --------------------------------------------------------------------------- paired significance
def _predictions(run: Path, right: list[bool], *, split: str = "test", start: int = 0) -> Path:
    """An eval/<split>/predictions.jsonl as `surgery evaluate` writes it: image i's true class is
    i % 3, predicted right where `right` says."""
    lines = []
    for i, ok in enumerate(right, start):
        true = str(i % 3)
        lines.append(json.dumps({"index": i, "true": true, "predicted": true if ok else str((i + 1) % 3)}))
    folder = run / "eval" / split
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def evaluated(tiny_run: Path, tmp_path: Path) -> dict[str, Path]:
    """A plain variant and two with CBAM, one run each, evaluated on the same 400 test images: the
    plain one right on 300, cbam4 on those and 60 more (better), cbam34 on 302 (not distinguishable)."""
    plain = _variant_of(tiny_run, tmp_path, name="plain", seed=0, best=0.60, final=0.60)
    spec = yaml.safe_load((plain / "spec.yaml").read_text())
    spec["surgery"] = []
    (plain / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    runs = {
        "plain": plain,
        "cbam4": _variant_of(tiny_run, tmp_path, name="cbam4", seed=0, best=0.70, final=0.69, at="layer4"),
        "cbam34": _variant_of(tiny_run, tmp_path, name="cbam34", seed=0, best=0.65, final=0.62),
    }
    _predictions(runs["plain"], [i < 300 for i in range(400)])
    _predictions(runs["cbam4"], [i < 360 for i in range(400)])
    _predictions(runs["cbam34"], [i < 298 or 390 <= i < 394 for i in range(400)])
    return runs


def test_compare_tests_each_variant_against_the_plain_one(evaluated: dict[str, Path], capsys) -> None:
    assert main(["compare", *map(str, evaluated.values()), "--markdown"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert rows["variant"][1:7] == ["rank", "test acc", "Δ acc vs plain [95% CI]", "Δ macro-F1 [95% CI]",
                                    "p (Holm)", "verdict"]  # fmt: skip
    assert rows["cbam4"][1:3] == ["1", "0.9000"] and rows["cbam4"][3].startswith("+0.1500 [+")
    assert rows["cbam4"][5].endswith("(mcnemar)") and rows["cbam4"][6] == "better"
    assert rows["plain"][1] == "3" and rows["plain"][3] == "baseline"
    assert rows["cbam34"][6].startswith("not distinguishable (~") and rows["cbam34"][6].endswith(" images)")
    assert [line.split(" | ")[0][2:] for line in out.splitlines()[2:5]] == ["cbam4", "cbam34", "plain"]
    assert "Holm-adjusted over 2 comparisons" in out and "nan" not in out.lower()
    # McNemar's p, Holm-adjusted: cbam4 has 60 discordant images, all its way
    assert float(rows["cbam4"][5].split()[0]) == pytest.approx(min(1, 2 * binomtest(60, 60, 0.5).pvalue), rel=1e-3)


def test_compare_json_carries_intervals_and_verdicts_and_is_deterministic(evaluated: dict[str, Path], capsys) -> None:
    args = ["compare", *map(str, evaluated.values()), "--json", "--baseline", "cbam34", "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == first
    sig = json.loads(first)["significance"]
    assert (sig["split"], sig["baseline"], sig["best"], sig["seed"]) == ("test", "cbam34", "cbam4", 5)
    pairs = {p["variant"]: p for p in sig["pairs"]}
    assert pairs["cbam4"]["verdict"] == "better" and pairs["plain"]["test"] == "mcnemar"
    assert pairs["plain"]["verdict_text"].startswith("not distinguishable from the baseline at this sample size")
    assert "one run a side: these two trained models, not their recipes" in pairs["plain"]["verdict_text"]
    assert pairs["cbam4"]["accuracy_difference"]["low"] > 0 and "Holm" in sig["procedure"]
    assert sig["rank"] == {"cbam4": "1", "cbam34": "2", "plain": "3"}


def test_variants_not_distinguishable_from_the_best_are_tied(evaluated: dict[str, Path], capsys) -> None:
    _predictions(evaluated["cbam4"], [i < 302 for i in range(400)])
    assert main(["compare", *map(str, evaluated.values()), "--json"]) == 0
    sig = json.loads(capsys.readouterr().out)["significance"]
    assert sig["best"] == "cbam4" and sig["rank"] == {"cbam4": "1", "cbam34": "tied", "plain": "tied"}


@pytest.mark.parametrize(
    "change, message, located",
    [
        (lambda r: _predictions(r["cbam4"], [True] * 400, start=1), "cbam4 was evaluated on images that no",
         "cbam4"),
        (lambda r: shutil.rmtree(r["cbam4"] / "eval"), "1 of the 3 runs have no predictions on the test split",
         "surgery evaluate"),
        (lambda r: (r["cbam4"] / "eval/test/predictions.jsonl").write_text('{"index": 0}\n'),
         "predictions.jsonl line 1 is not a prediction record", "cbam4"),
        (lambda r: (r["plain"] / "eval/test/predictions.jsonl").write_text(""),
         "predictions.jsonl holds no predictions", "plain"),
    ],
)  # fmt: skip
def test_paired_comparisons_refuse_clearly(evaluated: dict[str, Path], capsys, change, message, located) -> None:
    change(evaluated)
    assert main(["compare", *map(str, evaluated.values())]) == 2
    err = capsys.readouterr().err
    assert message in err and located in err and "Traceback" not in err


def test_a_baseline_that_does_not_exist_is_refused(evaluated: dict[str, Path], capsys) -> None:
    assert main(["compare", *map(str, evaluated.values()), "--baseline", "cbam5"]) == 2
    err = capsys.readouterr().err
    assert "--baseline" in err and "neither a variant nor one of the runs" in err and "cbam4" in err
    assert main(["compare", *map(str, evaluated.values()), "--resamples", "10"]) == 2
    assert "--resamples is too small for a 95% interval" in capsys.readouterr().err


def test_runs_without_predictions_say_which_command_evaluates_them(runs: dict[str, Path], capsys) -> None:
    assert main(["compare", *map(str, runs.values()), "--markdown"]) == 0
    captured = capsys.readouterr()
    assert "Δ acc" not in captured.out and "no run has predictions to compare pairwise" in captured.err
    assert f"surgery evaluate {runs['s0']} --split" in captured.err
    assert main(["compare", *map(str, runs.values()), "--baseline", "cbam34"]) == 2
    assert "--baseline needs the runs' predictions" in capsys.readouterr().err


@pytest.mark.slow
def test_paired_comparison_of_real_evaluations(tiny_run: Path, tmp_path: Path) -> None:
    """Two copies of one trained run, evaluated by `surgery evaluate` on the validation split: the same
    predictions, so a difference of exactly 0 with the interval [0, 0] and no verdict."""
    from surgery.evaluate.command import evaluate_run

    a = Path(shutil.copytree(tiny_run, tmp_path / "a"))
    evaluate_run(a, split="val", device="cpu")
    b = Path(shutil.copytree(a, tmp_path / "b-s0"))
    spec = yaml.safe_load((b / "spec.yaml").read_text())
    spec.update(name="b", train={**spec["train"], "epochs": 9})
    (b / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    from surgery.pages.paired import significance

    variants = aggregate(collect([a, b]))
    sig = significance(variants, baseline=str(a))
    other = "tiny-cbam (train.epochs=9)"  # summary.json still names it tiny-cbam
    assert sig.baseline == "tiny-cbam" and [v.label for v in variants] == ["tiny-cbam", other]
    pair = sig.pairs[other]
    assert sig.split == "val" and (pair.accuracy.low, pair.accuracy.high, pair.p) == (0.0, 0.0, 1.0)
    assert pair.verdict == "not distinguishable from the baseline at this sample size"


def test_compare_page_states_the_procedure_in_chromium(evaluated: dict[str, Path], tmp_path: Path) -> None:
    from surgery.pages.paired import significance

    variants = aggregate(collect(evaluated.values()))
    page = write_html(tmp_path / "compare.html", variants, significance(variants))
    shown = render(page, tmp_path, height=1600)
    assert "Is the difference real?" in shown.text and "Baseline: plain" in shown.text
    assert "cbam4 : better than plain" in shown.text and "Holm-adjusted" in shown.text
    assert "paired bootstrap percentile interval (2000 resamples" in shown.text
    assert "not distinguishable from it (tied)" not in shown.text  # plain and cbam34 are worse than cbam4
    assert_not_blank(shown.screenshot)
    keep_screenshot(shown.screenshot, "compare-significance.png")


def test_a_sweeps_comparison_shows_intervals_and_verdicts(evaluated: dict[str, Path], tmp_path: Path) -> None:
    from surgery.sweep import write_comparison

    folder = tmp_path / "sweep"
    folder.mkdir()
    data = {"variants": [{"run_dir": str(r), "label": k, "state": "COMPLETE"} for k, r in evaluated.items()]}
    variants, sig, note = write_comparison(folder, data)
    assert note is None and sig.baseline == "plain" and sig.pairs["cbam4"].verdict == "better"
    table = (folder / "comparison.md").read_text()
    assert "Δ acc vs plain [95% CI]" in table and "| better |" in table
    assert json.loads((folder / "sweep.json").read_text())["significance"]["rank"]["cbam4"] == "1"
    assert json.loads((folder / "comparison.json").read_text())["significance"]["baseline"] == "plain"
    shutil.rmtree(evaluated["cbam4"] / "eval")  # one trial not evaluated: the table, and why no test
    variants, sig, note = write_comparison(folder, data)
    assert sig is None and "1 of the 3 runs have no predictions" in note and "surgery evaluate" in note
    assert "Δ acc" not in (folder / "comparison.md").read_text()


def test_a_baseline_named_with_a_pipe_keeps_the_markdown_table_whole(evaluated: dict[str, Path], capsys) -> None:
    summary = json.loads((evaluated["plain"] / "summary.json").read_text())
    (evaluated["plain"] / "summary.json").write_text(json.dumps({**summary, "name": "pl|ain"}))
    assert main(["compare", *map(str, evaluated.values()), "--markdown"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "Δ acc vs pl\\|ain [95% CI]" in head and head.count(" | ") == 14
