"""The `surgery` command: inspect, validate, schema, run, sweep, lr-find, predict, evaluate, explain,
export, average, report, compare.

Each command is a small function from parsed arguments to the library call that does the work
(`surgery.train.command.run_specs`, `surgery.deploy.predict.predict_command`, ...), which takes plain
arguments. torch is imported only by the commands that need it, so `surgery --help` and
`surgery schema` answer at once. Any `UserError` prints a few located lines, without a
traceback, and exits with its exit code (2 for a mistake in what was asked).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from .errors import Origin, UsageError, UserError

EXIT_SPEC_ERROR = 2
# `surgery explain --method` (surgery.explain.results.METHODS, kept here so `--help` needs no torch)
_CAM_METHODS = (
    "gradcam",
    "gradcam++",
    "hirescam",
    "xgradcam",
    "layercam",
    "gradcam-elementwise",
    "eigencam",
    "eigengradcam",
    "scorecam",
    "ablationcam",
)
WEIGHTS = ["final", "best", "ema"]
# one default for every command: the spec's train.device (a trained run's recorded one); runtime.choose_device
_DEVICE_HELP = (
    "cpu, cuda, cuda:1, mps or auto (default: the spec's train.device; a trained run's recorded one; "
    "auto: cuda when available, else cpu)"
)  # predict.WEIGHT_CHOICES, without importing torch for --help


def _console(stderr: bool = False):
    import sys

    from .untrusted import Console

    stream = sys.stderr if stderr else sys.stdout
    # piped to a file or another program: full module paths, never cut to the terminal's width
    width = None if stream.isatty() else 1000
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def _add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=None,
        help="final (model.safetensors), best (the best epoch's) or ema (model_ema.safetensors); "
        "default: final, else best",
    )


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set train.epochs=3 (validated like the file)",
    )


def _args_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", help="a spec file, or a backbone id such as timm:resnet50")
    p.add_argument("--depth", type=int, default=None, help="fold the tree below this depth")
    p.add_argument("--json", action="store_true", help="print one JSON record per module instead")
    p.add_argument(
        "--schedule",
        action="store_true",
        help="print the epoch x group table of lr and frozen/trainable (each layer's lr for layer_decay groups)",
    )
    p.add_argument(
        "--features",
        action="store_true",
        help="print the feature stages (what `export --format features` outputs) with their shapes",
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="PX",
        help="probe input size (default: the spec's data.image_size, or the backbone's)",
    )
    p.add_argument(
        "--list",
        metavar="SOURCE",
        choices=["timm", "torchvision"],
        help="list the backbone names of timm or torchvision (TARGET filters, e.g. 'resnet*')",
    )
    _add_set(p)


def _args_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC", help="a spec file, or a sweep file (a `sweep:` key)")
    p.add_argument(
        "--show-resolved",
        action="store_true",
        help="print each valid spec resolved (bases merged, --set applied, defaults filled: the "
        "spec.yaml a run writes) on stdout, and nothing else there",
    )
    _add_set(p)


def _args_schema(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sweep",
        action="store_true",
        help="the sweep file's schema instead (schema.json's $defs/sweep_file, with a root of its own)",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="write it to FILE instead (atomically: FILE is either the old file or the new one)",
    )


def _args_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+")
    p.add_argument(
        "--out", default=None, help="run directory (default runs/<name>; with several specs, a parent folder)"
    )
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.add_argument("--resume", action="store_true", help="continue from checkpoints/last.pt in the run directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory (its files are deleted)")
    _add_set(p)


def _args_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_file", help="a sweep file: a base spec and the axes to vary (see docs/sweeps.md)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on this machine (default 1); one GPU each when there are GPUs, "
        "the CPU cores shared out otherwise",
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="the study's database, e.g. postgresql://USER:PASSWORD@HOST/DB for several machines "
        "(default: sqlite:///<out>/study.db)",
    )
    p.add_argument(
        "--out", default=None, help="the sweep's folder (default runs/<name>); a variant's run goes in OUT/<variant>"
    )
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for an SQLite study that another process holds locked, saying so on "
        "stderr, before giving up with exit code 1 (default: surgery.sweep.LOCK_TIMEOUT, 120)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --workers N's processes
    _add_set(p)


def _args_lr_find(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec")
    p.add_argument(
        "--stage",
        type=int,
        default=0,
        metavar="EPOCH",
        help="sweep the groups that train at this epoch, from their lrs at it (default 0)",
    )
    p.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps of the sweep (default 100)")
    p.add_argument("--start", type=float, default=1e-4, metavar="MULT", help="first multiplier (default 1e-4)")
    p.add_argument("--end", type=float, default=1e3, metavar="MULT", help="last multiplier (default 1e3)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where lr_find.png and lr_find.json go (default runs/<name>-lr-find; never a run directory)",
    )
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    _add_set(p)


def _args_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    _add_weights(p)


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--split",
        choices=["test", "val"],
        default=None,
        help="the run's test split (data.test_split, or the dataset's own; the default) or its "
        "validation split (it selected the model, so it flatters)",
    )
    what.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a folder PATH/<class>/<image>, class folders named after the run's classes",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="also score the mean softmax over a horizontal flip (and corner crops where the eval "
        "transform crops), with the gain over no TTA",
    )
    p.add_argument(
        "--shift",
        default=None,
        metavar="NAMES",
        help="score the split (test, else val) clean and under fixed, seeded corruptions: a comma-separated "
        "list of rotate, blur, noise, or all; writes eval/<split>-shift/shift.json",
    )
    _add_weights(p)
    p.add_argument("--json", action="store_true", help="print metrics.json as one JSON object")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help=_DEVICE_HELP)


def _args_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `surgery run`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument(
        "--layer",
        default=None,
        metavar="PATH",
        help="where to take the CAM: a module path or glob, or @inserted (default: the last feature map "
        "before the classifier)",
    )
    p.add_argument(
        "--class",
        dest="class_name",
        default=None,
        metavar="NAME",
        help="the class to explain (default: the predicted one)",
    )
    p.add_argument(
        "--method",
        default="gradcam",
        choices=list(_CAM_METHODS),
        metavar="METHOD",
        help="the grad-cam method: " + ", ".join(_CAM_METHODS) + " (default: gradcam)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="where the figures go (default: RUN_DIR/explain)")
    p.add_argument("--device", default=None, help=_DEVICE_HELP)


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument(
        "--format",
        choices=["pt2", "onnx", "torchscript", "features"],
        default="pt2",
        help="features: the multi-scale backbone for a detector or segmenter "
        "(a folder, default RUN_DIR/export/features)",
    )
    p.add_argument("--out", default=None)
    stages = p.add_mutually_exclusive_group()
    stages.add_argument(
        "--out-indices",
        type=int,
        nargs="+",
        default=None,
        metavar="I",
        help="--format features: the stages by index, as timm's out_indices (default: every stage)",
    )
    stages.add_argument(
        "--stages", nargs="+", default=None, metavar="PATH", help="--format features: the stages by module path"
    )
    _add_weights(p)


def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a run directory, finished or not (spec.yaml or metrics.jsonl in it)",
    )


def _args_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories (summary.json in each)")
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE.html",
        help="also write the comparison page (table and overlaid validation curves) to FILE.html",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="RUN_OR_VARIANT",
        help="compare every variant against this one (a variant's label, or one of its run folders or names); "
        "default: the only variant without surgery, else the best by mean accuracy",
    )
    p.add_argument("--seed", type=int, default=0, help="the paired bootstrap's seed (numpy default_rng; default 0)")
    p.add_argument("--resamples", type=int, default=2000, help="the paired bootstrap's resamples (default 2000)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the table as JSON instead")
    shown.add_argument("--markdown", action="store_true", help="print the table as Markdown instead")


def _args_average(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories (one for --wise and --swa)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--wise",
        default=None,
        metavar="ALPHA|auto",
        help="WiSE-FT: alpha * fine-tuned + (1 - alpha) * the model before fine-tuning; auto: the best "
        "of 0, 0.1, ..., 1 on the validation split",
    )
    how.add_argument(
        "--soup",
        default=None,
        choices=["uniform", "greedy"],
        help="the mean of several runs; greedy: best validation first, a run added only if validation improves",
    )
    how.add_argument("--swa", action="store_true", help="the mean of the run's last kept epochs (train.keep_epochs)")
    p.add_argument(
        "--swa-epochs", type=int, default=None, metavar="K", help="--swa: the last K epochs (default: every kept one)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the new run directory (must not exist)")
    p.add_argument("--device", default=None, help=_DEVICE_HELP)


# the subcommands in the order `surgery --help` lists them: (name, help, the function adding its arguments)
_COMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("inspect", "show a backbone's or a spec's module tree, groups, load report and schedule", _args_inspect),
    (
        "validate",
        "check specs (or sweep files: every variant) against the schema and the real model; exit 0 or 2",
        _args_validate,
    ),
    ("schema", "print the spec's JSON Schema, or the sweep file's (for editors)", _args_schema),
    ("run", "train one or more specs, one after another", _args_run),
    ("sweep", "train every variant of a sweep file (grid, random or TPE search) on an Optuna study", _args_sweep),
    ("lr-find", "sweep one factor over every trainable group's lr; suggest one (writes a plot)", _args_lr_find),
    ("predict", "classify images with a trained run", _args_predict),
    ("evaluate", "score a trained run on its held-out test split or a folder of labelled images", _args_evaluate),
    ("explain", "Grad-CAM and the inserted modules' attention for images, with a trained run", _args_explain),
    ("export", "export a trained run as a deployable model", _args_export),
    (
        "average",
        "weight-space averaging of finished runs into a new run: WiSE-FT, uniform or greedy soups, SWA",
        _args_average,
    ),
    ("report", "write RUN_DIR/report.html again: one self-contained page about a run", _args_report),
    (
        "compare",
        "finished runs side by side: best and final accuracy, parameters added, speed, validation curves; "
        "seeds of one variant as mean ± std; with evaluated runs, each variant against a baseline (paired "
        "95%% intervals, p, verdict)",
        _args_compare,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The `surgery` argument parser: one subcommand per row of `_COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Declarative model surgery for pretrained PyTorch image models: insert attention "
        "modules, keep every pretrained weight, fine-tune with staged parameter groups.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, add_arguments in _COMMANDS:
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


# --------------------------------------------------------------------------- commands
def _spec_for_target(target: str, overrides: Sequence[str], input_size: int | None):
    from pathlib import Path

    from .spec import load_spec

    if Path(target).suffix in (".yaml", ".yml") or Path(target).is_file():
        spec = load_spec(target, overrides)
        if input_size:
            spec = load_spec(target, [*overrides, f"data.image_size={input_size}"])
        return spec, True
    if ":" not in target:
        raise UsageError(
            "the target is neither a spec file nor a backbone id",
            origin=Origin.path(target),
            found=repr(target),
            expected="a .yaml spec, or <source>:<name> such as torchvision:resnet18 or timm:resnet50",
        )
    data = {"model": {"backbone": target, "pretrained": False}}
    spec = load_spec(data, overrides)
    if input_size is None:
        from .model.backbones import create_backbone

        size = create_backbone(spec).data_config.get("input_size", (3, 224, 224))[-1]
    else:
        size = input_size
    return load_spec({**data, "data": {"image_size": int(size)}}, overrides), False


def cmd_inspect(args: argparse.Namespace) -> int:
    console = _console()
    if args.list:
        from fnmatch import fnmatch

        from .spec import backbone_names

        names = [n for n in backbone_names(args.list) if not args.target or fnmatch(n, args.target)]
        console.print("\n".join(f"{args.list}:{n}" for n in names))
        return 0
    if not args.target:
        raise UsageError(
            "a TARGET is needed",
            origin=Origin("flag", "surgery inspect"),
            found="nothing",
            expected="a spec file or a backbone id such as timm:resnet50",
        )
    spec, is_spec = _spec_for_target(args.target, args.overrides, args.input_size)
    print_warnings(spec)
    from .model.builder import build
    from .model.views import features_table, groups_table, module_records, module_tree, report_table, schedule_rich

    built = build(spec)
    if args.json:
        sys.stdout.write(json.dumps(module_records(built), indent=1) + "\n")
        return 0
    if args.schedule:
        from .train.schedule import schedule_table

        note = "plateau: lr drops by a factor when val loss stalls" if spec.train.scheduler.name == "plateau" else ""
        if any(g.unfreeze_rule is not None for g in spec.groups):
            note += ("; " if note else "") + "a rule in place of an lr: decided during the run"
        if spec.train.early_stop is not None:
            note += ("; " if note else "") + (
                f"early stop on {spec.train.early_stop} once every group that unfreezes has"
            )
        console.print(schedule_rich(schedule_table(spec), [g.name for g in spec.groups], note))
        if any(g.layer_decay is not None for g in spec.groups):
            from .model.views import layers_rich

            console.print(layers_rich(built))
        return 0
    if args.features:
        from .deploy.features import discover_stages

        console.print(features_table(discover_stages(built), built.input_size))
        return 0
    console.print(module_tree(built, depth=args.depth))
    if is_spec:
        console.print(report_table(built.report))
        console.print(groups_table(built, 0))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .validation import validate

    console = _console(stderr=args.show_resolved)  # stdout holds the resolved YAML alone
    failed = 0
    for path in args.specs:
        try:
            if _is_sweep_file(path):
                _validate_sweep(path, args, console)
                continue
            result = validate(path, overrides=args.overrides, warn=_warn)
        except UserError as err:
            failed += 1
            _print_error(err)
            continue
        spec, built = result.spec, result.built
        if args.show_resolved:
            sys.stdout.write(("---\n" if len(args.specs) > 1 else "") + spec.to_yaml())
        console.print(
            f"[green]ok[/green] {path}: {built.spec.model.backbone}, {len(built.inserted)} modules inserted, "
            + (f"{len(built.adapters)} LoRA adapters, " if built.adapters else "")
            + f"{len(built.groups)} groups, {len(built.report.loaded)} pretrained tensors loaded",
            soft_wrap=True,
        )
        for note in built.notes:
            console.print(f"  note: {note}", soft_wrap=True, markup=False)
    return EXIT_SPEC_ERROR if failed else 0


def _is_sweep_file(path: str) -> bool:
    from .sweep import is_sweep_file

    return is_sweep_file(path)


def _validate_sweep(path: str, args: argparse.Namespace, console: Any) -> None:
    """A sweep file: its own schema, then every variant's spec (grid), or every axis value and
    range end (random, tpe), each through `surgery.validate`."""
    from pathlib import Path

    from rich.markup import escape

    from .spec import load_spec
    from .sweep import check_variants, load_sweep

    sweep = load_sweep(path)
    variants = check_variants(sweep, args.overrides, Path("runs"), _warn)
    if args.show_resolved:  # a grid's variants (random and tpe draw theirs while they run)
        for i, variant in enumerate(variants):
            spec = load_spec(sweep.spec, [*sweep.set, *args.overrides, *variant.overrides])
            sys.stdout.write(("---\n" if len(args.specs) > 1 or i else "") + spec.to_yaml())
    what = f"{sweep.trials} variants" if sweep.sampler == "grid" else f"{sweep.trials} trials ({sweep.sampler})"
    console.print(
        f"[green]ok[/green] {escape(path)}: sweep {escape(sweep.name)}, {what} of {escape(str(sweep.spec))}, "
        "every variant's spec valid",
        soft_wrap=True,
    )


def cmd_schema(args: argparse.Namespace) -> int:
    from .spec.schema import schema

    text = json.dumps(schema("sweep" if args.sweep else "spec"), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        _write_atomic(args.output, text)
    except OSError as exc:
        from .errors import Origin, UserError

        _print_error(
            UserError(f"cannot write the schema: {exc.strerror or exc}", origin=Origin.flag("--output", args.output))
        )
        return 1  # the folder is at fault, not what was asked
    from rich.markup import escape

    _console(stderr=True).print(f"wrote {escape(args.output)}", soft_wrap=True)
    return 0


def _write_atomic(path: str, text: str) -> None:
    """A temporary file beside `path`, then a rename (`files.replace_with`): an editor never reads
    half a schema, and an error leaves nothing behind (raised as the OSError it was)."""
    from pathlib import Path

    from .files import replace_with, write_raw

    replace_with(Path(path), lambda tmp: write_raw(tmp, text.encode("utf-8")))


def cmd_run(args: argparse.Namespace) -> int:
    from .train.command import run_specs

    return run_specs(
        args.specs,
        out=args.out,
        overrides=args.overrides,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        warn=print_warnings,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import LOCK_TIMEOUT, sweep_command

    lock_timeout = LOCK_TIMEOUT if args.lock_timeout is None else args.lock_timeout
    return sweep_command(
        args.sweep_file,
        workers=args.workers,
        storage=args.storage,
        out=args.out,
        device=args.device,
        overrides=args.overrides,
        worker=args.worker,
        lock_timeout=lock_timeout,
        warn=_warn,
    )


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .train.lr_find import lr_find_command

    return lr_find_command(
        args.spec,
        args.overrides,
        stage=args.stage,
        steps=args.steps,
        start=args.start,
        end=args.end,
        out=args.out,
        device=args.device,
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from .deploy.predict import predict_command

    return predict_command(
        args.run_dir,
        args.paths,
        topk=args.topk,
        as_json=args.json,
        batch_size=args.batch_size,
        device=args.device,
        weights=args.weights,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate.command import evaluate_command

    if args.shift is not None:
        from .evaluate.shift import shift_command

        return shift_command(
            args.run_dir,
            args.shift,
            split=args.split,
            data=args.data,
            tta=args.tta,
            weights=args.weights,
            as_json=args.json,
            batch_size=args.batch_size,
            device=args.device,
        )
    return evaluate_command(
        args.run_dir,
        split=args.split,
        data=args.data,
        tta=args.tta,
        weights=args.weights,
        as_json=args.json,
        batch_size=args.batch_size,
        device=args.device,
    )


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain.command import explain_command

    return explain_command(
        args.run_dir,
        args.images,
        layer=args.layer,
        class_name=args.class_name,
        method=args.method,
        out=args.out,
        device=args.device,
    )


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "features":
        from .deploy.features import export_command as export_features

        return export_features(args.run_dir, args.out_indices, args.stages, args.out, args.weights)
    chosen = "--out-indices" if args.out_indices is not None else "--stages" if args.stages is not None else None
    if chosen:
        raise UsageError(
            f"{chosen} chooses feature stages, which only --format features exports",
            origin=Origin.flag(chosen),
            found=f"--format {args.format} {chosen}",
            expected=f"--format features {chosen} ..., or --format {args.format} without {chosen}",
        )
    from .deploy.export import export_command

    return export_command(args.run_dir, args.format, args.out, args.weights)


def cmd_average(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from .average.command import average_runs

    if args.swa_epochs is not None and not args.swa:
        raise UsageError(
            "--swa-epochs counts the epochs --swa averages",
            origin=Origin.flag("--swa-epochs", args.swa_epochs),
            expected="--swa --swa-epochs K, or no --swa-epochs",
        )
    console = _console(stderr=True)
    out = average_runs(
        args.run_dirs,
        args.out,
        wise_alpha=args.wise,
        soup_kind=args.soup,
        swa_on=args.swa,
        swa_epochs=args.swa_epochs,
        device=args.device,
        say=lambda text: console.print(escape(text), soft_wrap=True),
    )
    console.print(f"wrote {escape(str(out))}", soft_wrap=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.markup import escape

    from .pages.run_page import check_run_dir, write_report

    for run_dir in args.run_dirs:  # every folder checked before any page is written
        check_run_dir(Path(run_dir))
    for run_dir in args.run_dirs:
        _console(stderr=True).print(f"wrote {escape(str(write_report(run_dir)))}", soft_wrap=True)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .pages.compare import compare_command

    return compare_command(
        args.run_dirs,
        out=args.out,
        as_json=args.json,
        as_markdown=args.markdown,
        baseline=args.baseline,
        seed=args.seed,
        resamples=args.resamples,
        console=_console(),
    )


COMMANDS = {
    "inspect": cmd_inspect,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "run": cmd_run,
    "sweep": cmd_sweep,
    "lr-find": cmd_lr_find,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
    "explain": cmd_explain,
    "export": cmd_export,
    "average": cmd_average,
    "report": cmd_report,
    "compare": cmd_compare,
}


def print_warnings(spec: Any) -> None:
    """Located notes on legal but probably unintended settings (stderr, so --json stays clean)."""
    for text in spec.warnings:
        _warn(text)


def _warn(text: str) -> None:
    from rich.markup import escape

    from .errors import printable  # a warning quotes user values too

    _console(stderr=True).print(f"[yellow]warning[/yellow] {escape(printable(text))}", soft_wrap=True)


def _print_error(err: UserError) -> None:
    from rich.markup import escape

    from .untrusted import Console

    # soft_wrap: long paths and hints stay on their own lines, so a terminal or a log can be grepped
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error[/bold red] {escape(str(err))}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        _print_error(err)
        return err.exit_code
    except KeyboardInterrupt:
        _console(stderr=True).print("[yellow]interrupted[/yellow]")
        return 130
