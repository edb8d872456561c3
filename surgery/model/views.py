"""What came out of a build, for people (rich trees and tables) and for scripts (JSON records)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from torch import nn

from ..train.schedule import schedule_table, trainable_at, unfreeze_epochs
from .builder import Built
from .insert import Inserted
from .paths import type_names
from .weights import LoadReport


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _human(n: int) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def module_records(built: Built) -> list[dict[str, Any]]:
    """One record per module (model order): path, type, params, output_shape, inserted, group.

    `group` is the group owning every parameter under the module, a list when several do,
    None for a module without parameters.
    """
    owner = built.group_of()
    inserted = {i.path for i in built.inserted}
    changed = {c.path: f"{c.kind}: {c.label}" for c in built.changes}
    records = []
    for path, module in built.model.named_modules():
        groups = list(dict.fromkeys(owner[f"{path}.{n}" if path else n] for n, _ in module.named_parameters()))
        shape = built.shapes.get(path)
        records.append(
            {
                "path": path,
                "type": f"Inserted[{type(module.attn).__name__}]"
                if isinstance(module, Inserted)
                else type_names(module)[0],
                "params": _count(module),
                "output_shape": list(shape.output) if shape and shape.output else None,
                "inserted": path in inserted or any(path.startswith(p + ".") for p in inserted),
                "group": groups[0] if len(groups) == 1 else (groups or None),
                "changed": changed.get(path),  # "replace: surgery[0] (line 7): ...", or None
            }
        )
    return records


def module_tree(built: Built, depth: int | None = None) -> Tree:
    """A rich tree of the surgered model: type, parameters, output shape, group; inserted modules in green."""
    records = {r["path"]: r for r in module_records(built)}
    root_rec = records[""]
    label = Text.assemble(
        (built.spec.model.backbone, "bold"),
        f"  {root_rec['type']}  {_human(root_rec['params'])} params",
        f"  -> {root_rec['output_shape']}" if root_rec["output_shape"] else "",
    )
    tree = Tree(label)

    def add(parent: Tree, module: nn.Module, prefix: str, level: int) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            rec = records[path]
            style = "green" if rec["inserted"] else ""
            text = Text(name, style=f"bold {style}".strip())
            text.append(f"  {rec['type']}", style="cyan")
            if isinstance(child, Inserted):
                text.append(f"  [inserted {child.position} {child.target}]", style="green")
            if rec["changed"]:
                kind, _, label = rec["changed"].partition(": ")
                text.append(
                    f"  [{kind}d by {label.partition(': ')[0]}]"
                    if kind in ("replace", "remove")
                    else f"  [{label.partition(': ')[0]}]",
                    style="yellow",
                )
            if rec["params"]:
                text.append(f"  {_human(rec['params'])}")
            if rec["output_shape"]:
                text.append(f"  -> {rec['output_shape']}", style="dim")
            group = rec["group"]
            if group and (not prefix or records[prefix]["group"] != group):
                text.append(f"  [{group if isinstance(group, str) else ', '.join(group)}]", style="magenta")
            branch = parent.add(text)
            if depth is None or level + 1 < depth:
                add(branch, child, path, level + 1)
            elif any(True for _ in child.children()):
                branch.add(Text(f"... {sum(1 for _ in child.modules()) - 1} modules folded (--depth)", style="dim"))

    add(tree, built.model, "", 0)
    return tree


def groups_table(built: Built, epoch: int = 0) -> Table:
    """The groups: patterns, parameters (all, and trainable at `epoch`), lr, unfreeze epoch, state."""
    table = Table(title=f"parameter groups (first match wins); trainable at epoch {epoch}")
    for col in ("group", "patterns", "params", "trainable", "lr", "unfreeze_at", f"epoch {epoch}"):
        table.add_column(col)
    params = dict(built.model.named_parameters())
    starts = unfreeze_epochs(built.spec)
    trains = {g.name: trainable_at(g.spec, epoch, starts[g.name]) for g in built.groups}
    counts = {g.name: sum(params[p].numel() for p in g.params) for g in built.groups}
    total = sum(counts.values())
    trainable = sum(n for name, n in counts.items() if trains[name])
    table.caption = f"trainable at epoch {epoch}: {_human(trainable)} of {_human(total)} parameters"
    for g in built.groups:
        n = counts[g.name]
        lr = ", ".join(f"{lr:g} from {e}" if len(g.spec.lr) > 1 else f"{lr:g}" for e, lr in g.spec.lr)
        if g.spec.layer_decay is not None:
            lr += f" x {g.spec.layer_decay:g}^depth"
        rule = g.spec.unfreeze_rule
        unfreeze = (str(starts[g.name]) if starts[g.name] is not None else "never" if rule is None else str(rule)) + (
            f" ({rule})" if rule is not None and starts[g.name] is not None else ""
        )
        state = (
            Text("trainable", style="green")
            if trains[g.name]
            else Text(
                "frozen" if rule is None or starts[g.name] is not None else "frozen until its rule fires", style="blue"
            )
        )
        table.add_row(
            g.name,
            ", ".join(str(s) for s in g.spec.params),
            _human(n),
            _human(n) if trains[g.name] else "0",
            lr,
            unfreeze,
            state,
        )
    return table


def report_table(report: LoadReport) -> RichGroup:
    """The load report as a summary table plus the details worth reading."""
    table = Table(title="load report", show_header=True)
    table.add_column("tensors")
    table.add_column("count", justify="right")
    table.add_column("what")
    table.add_row("loaded", str(len(report.loaded)), f"bit-identical from {report.source}")
    if report.random:
        table.add_row("random", str(len(report.random)), "no pretrained weights asked for (pretrained: false)")
    table.add_row(
        "re-initialised", str(len(report.reinitialised)), "; ".join(sorted(set(report.reinitialised.values()))) or "-"
    )
    table.add_row("new", str(len(report.new)), "inserted modules")
    if report.defaulted:
        table.add_row("defaulted", str(len(report.defaulted)), "BatchNorm step counters absent from the file")
    if report.mapped:
        table.add_row("renamed", str(len(report.mapped)), "file keys mapped by model.key_map")
    if report.kept:
        table.add_row("kept", str(len(report.kept)), "of them, in replaced modules: same name and shape")
    if report.adapted:
        table.add_row("adapted", str(len(report.adapted)), "; ".join(report.adapted.values()))
    if report.dropped:
        table.add_row("dropped", str(len(report.dropped)), "file tensors of replaced or removed modules")
    table.add_row("unused", str(len(report.unused)), ", ".join(report.unused[:4]) or "-")
    parts: list[Any] = [table]
    if report.inserted_modules:
        ins = Table(title="inserted modules")
        for col in ("path", "type", "position", "channels", "init", "params"):
            ins.add_column(col)
        for m in report.inserted_modules:
            ins.add_row(
                m["path"],
                m["type"],
                f"{m['position']} {m['target']}",
                str(m["channels"]),
                m["init"],
                _human(m["params"]),
            )
        parts.append(ins)
    if report.changed_modules:
        ch = Table(title="changed modules")
        for col in ("path", "change", "old", "new", "by"):
            ch.add_column(col)
        for c in report.changed_modules:
            ch.add_row(c["path"], c["kind"], c["old"], c["new"], c["by"].partition(": ")[0])
        parts.append(ch)
    if report.imports:
        parts.append(Text("imported user code: " + ", ".join(report.imports), style="yellow"))
    return RichGroup(*parts)


def features_table(stages: Iterable[Any], input_size: tuple[int, ...]) -> Table:
    """`surgery inspect --features`: one row per feature stage (a `deploy.features.Stage`), with
    its NCHW shape on the probe input: the index `--out-indices` takes, the path `--stages` takes."""
    table = Table(title=f"feature stages on a {list(input_size)} input", title_justify="left")
    for column in ("index", "module", "channels", "reduction", "shape (NCHW)", "layout"):
        table.add_column(column, justify="right" if column in ("index", "channels", "reduction") else "left")
    for i, stage in enumerate(stages):
        shape = list(stage.shape) if len(stage.shape) == 4 else f"{list(stage.shape)}: not a map"
        layout = "NHWC, permuted" if stage.channels_last else "NCHW" if len(stage.shape) == 4 else "-"
        table.add_row(str(i), stage.module, str(stage.num_chs), f"/{stage.reduction}", str(shape), layout)
    return table


def schedule_rich(rows: Iterable[Mapping[str, Any]], group_names: list[str], note: str = "") -> Table:
    """Epoch x group table: learning rate when trainable, 'frozen' otherwise, and an event rule's
    text ('plateau val_loss/2', 'after new +3') from the first epoch it could fire."""
    table = Table(title="schedule (lr at the start of each epoch)" + (f" - {note}" if note else ""))
    table.add_column("epoch", justify="right")
    for name in group_names:
        table.add_column(name, justify="right")
    for row in rows:
        cells = []
        for name in group_names:
            g = row["groups"][name]
            if g["trainable"] is None:  # decided by an event rule during the run
                cells.append(Text(g["rule"], style="yellow"))
            else:
                cells.append(Text(f"{g['lr']:.3g}", style="green") if g["trainable"] else Text("frozen", style="blue"))
        table.add_row(str(row["epoch"]), *cells)
    return table


def _span(names: list[str]) -> str:
    """A short name for the modules holding `names`: their common module path, or the few modules
    just below it ('conv1, bn1'; 'layer3.1, layer3.cbam_after')."""
    paths = [n.split(".")[:-1] or [n] for n in names]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    below = list(dict.fromkeys(".".join(p[: len(common) + 1]) for p in paths))
    if len(below) <= 3:
        return ", ".join(below)
    return ".".join(common) if common else f"{', '.join(below[:3])} ... ({len(below)})"


def _layer_lr(cell: Mapping[str, Any], scale: float) -> float | None:
    return None if cell["trainable"] is False else cell["lr"] * scale


def layer_rows(built: Built) -> list[dict[str, Any]]:
    """One record per (group with layer_decay, layer), top layer first: what `inspect --schedule`
    prints under the schedule. Each has group, layer, modules, params, scale and ``lrs``, the lr
    at the start of every epoch (the group's lr in the schedule times the scale; None while the
    group is frozen)."""
    table = schedule_table(built.spec)
    params = dict(built.model.named_parameters())
    rows = []
    for g in built.groups:
        if g.spec.layer_decay is None or g.layers is None:
            continue
        for layer, scale in sorted(g.lr_scales().items(), reverse=True):
            names = [p for p in g.params if g.layer_of(p) == layer]
            rows.append(
                {
                    "group": g.name,
                    "layer": layer,
                    "modules": _span(names),
                    "params": sum(params[p].numel() for p in names),
                    "scale": scale,
                    "lrs": [_layer_lr(row["groups"][g.name], scale) for row in table],
                }
            )
    return rows


def layers_rich(built: Built, max_epochs: int = 6) -> Table:
    """`layer_rows` as a table: the lr of each layer at the start of each epoch (the first
    `max_epochs` epochs and the last one)."""
    rows = layer_rows(built)
    rule = next(g.layers.rule for g in built.groups if g.spec.layer_decay is not None and g.layers is not None)
    epochs = built.spec.train.epochs
    shown = list(range(min(epochs, max_epochs))) + ([epochs - 1] if epochs > max_epochs else [])
    how = (
        "timm's group_matcher, as param_groups_layer_decay"
        if rule == "timm group_matcher"
        else "structure (no group_matcher): blocks in model order"
    )
    table = Table(title=f"layer-wise lr decay; layers by {how}; the head is the top layer")
    for col in ("group", "layer", "modules", "params", "scale", *(f"epoch {e}" for e in shown)):
        table.add_column(col, justify="left" if col in ("group", "modules") else "right")
    for r in rows:
        table.add_row(
            r["group"],
            str(r["layer"]),
            r["modules"],
            _human(r["params"]),
            f"{r['scale']:.4g}",
            *(Text("frozen", style="blue") if r["lrs"][e] is None else f"{r['lrs'][e]:.3g}" for e in shown),
        )
    table.caption = "lr = the group's lr in the schedule above x scale; scale = layer_decay^(top - layer)"
    return table
