"""Is the difference real? Paired statistics of variants against a baseline, on the same images.

    bootstrap(y_true, pred_v, pred_b)   the paired bootstrap: differences in accuracy and macro-F1
                                        with their 95% percentile intervals, and a two-sided p
    mcnemar(correct_v, correct_b)       McNemar's exact test on the discordant images (one seed a side)
    holm(pvalues)                       Holm's step-down adjustment for m comparisons
    verdict(estimate, p)                "better", "worse" or "not distinguishable ..."
    more_needed(estimate, half, n)      roughly how many seeds / images would resolve an undecided pair
    compare_pairs(...)                  every variant against one baseline, Holm-adjusted
    significance(variants, ...)         the same from the runs' ``eval/<split>/predictions.jsonl``

The bootstrap, exactly: with ``rng = numpy.random.default_rng(seed)``, each of B resamples (default
2000) draws n image indices with replacement (the same indices for both sides: the pairing), and,
for each side independently, as many of its seeds as it has, with replacement. A side's figure in a
resample is the mean over its drawn seeds of accuracy (or macro-F1) on the drawn images, each image
counted as often as it was drawn; the difference is variant minus baseline. The 95% interval is the
2.5th and 97.5th percentile of the B differences; the two-sided p is
``min(1, 2 * min(#(d <= 0) + 1, #(d >= 0) + 1) / (B + 1))``. Macro-F1 averages over every class that
occurs in the labels or in any prediction of either side, a class without images or predictions in a
resample scoring 0 (scikit-learn's ``zero_division=0``). A single-seed pair (one run a side) is also
tested with McNemar's exact test: ``scipy.stats.binomtest(c, b + c, 0.5)``, b the images only the
baseline gets right, c those only the variant gets right; its p then decides, else the bootstrap's.

The p values of all the comparisons against one baseline are adjusted with Holm's method; a variant
is "better" (or "worse") when its adjusted p is below 0.05 and its accuracy difference is positive
(negative), else "not distinguishable from the baseline at this sample size". For an undecided pair
with a difference d and an interval half-width h (half its width), the interval is taken to narrow
as 1/sqrt(n): n' = n * (h / |d|)^2 seeds (several a side) or test images (one run a side) would
bring h down to |d|. Numpy and scipy only (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Origin, UsageError

ALPHA = 0.05
RESAMPLES = 2000
SEED = 0
_CHUNK = 200  # resamples per matrix product: bounds memory at chunk x images

BETTER, WORSE, UNDECIDED = "better", "worse", "not distinguishable from the baseline at this sample size"


# --------------------------------------------------------------------------- the statistics
@dataclass(frozen=True)
class Interval:
    """An observed difference and its 95% bootstrap interval."""

    estimate: float
    low: float
    high: float

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2

    def format(self, digits: int = 4) -> str:
        """``+0.0123 [-0.0040, +0.0290]``."""
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def _counts(rng: np.random.Generator, size: int, draws: int) -> np.ndarray:
    """`draws` resamples of `size` indices with replacement, as counts: (draws, size)."""
    picks = rng.integers(0, size, (draws, size))
    offsets = (np.arange(draws) * size)[:, None]
    counts = np.bincount((picks + offsets).ravel(), minlength=draws * size).reshape(draws, size)
    return counts.astype(np.float32)  # whole numbers below 2^24: exact, and half the cost of float64


def _class_columns(y_true: np.ndarray, pred: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per image: each run's [true positive, predicted] per class, then [true] per class once ->
    (n, runs * 2C + C), float32 (counts of at most n images: exact)."""
    truth = y_true[:, None] == classes[None, :]
    blocks = []
    for row in pred:
        said = row[:, None] == classes[None, :]
        blocks += [truth & said, said]
    return np.concatenate([*blocks, truth], axis=1).astype(np.float32)


def _macro_f1(sums: np.ndarray, runs: int, n_classes: int) -> np.ndarray:
    """(draws, runs * 2C + C) weighted sums -> (draws, runs) macro-F1, 0/0 scoring 0."""
    parts = sums[:, : runs * 2 * n_classes].reshape(sums.shape[0], runs, 2, n_classes).astype(np.float64)
    tp, said = parts[:, :, 0], parts[:, :, 1]
    true = sums[:, None, runs * 2 * n_classes :].astype(np.float64)
    denominator = said + true
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=2)


def _seed_weights(rng: np.random.Generator, seeds: int, draws: int) -> np.ndarray:
    """(draws, seeds): how often each seed is drawn, with replacement, divided by the number drawn."""
    if seeds == 1:
        return np.ones((draws, 1))
    return _counts(rng, seeds, draws).astype(np.float64) / seeds


@dataclass(frozen=True)
class Block:
    """Images both sides were evaluated on, and each side's predictions on them.

    y_true: each image's class (n,); variant, baseline: each run's predicted classes, (runs, n).
    """

    y_true: np.ndarray
    variant: np.ndarray
    baseline: np.ndarray


def _block_draws(rng: np.random.Generator, block: Block, draws: int, with_f1: bool = True) -> tuple[Any, ...]:
    """(accuracy, macro-F1) differences of one block: the observed one and `draws` resampled ones
    (macro-F1 0 without `with_f1`; the draws are the same either way)."""
    y, pv, pb = block.y_true, np.atleast_2d(block.variant), np.atleast_2d(block.baseline)
    n, kv, kb = len(y), len(pv), len(pb)
    classes = np.unique(np.concatenate([y, pv.ravel(), pb.ravel()]))
    correct = np.concatenate([pv == y, pb == y]).T.astype(np.float32)  # (n, kv + kb)
    columns = (
        _class_columns(y, np.concatenate([pv, pb]), classes) if with_f1 else np.zeros((n, len(classes)), np.float32)
    )
    out: list[list[np.ndarray]] = [[], []]
    for start in range(0, draws, _CHUNK):
        weights = _counts(rng, n, min(_CHUNK, draws - start))
        sides = _seed_weights(rng, kv, len(weights)), _seed_weights(rng, kb, len(weights))
        acc = (weights @ correct).astype(np.float64) / n
        f1 = _macro_f1(weights @ columns, kv + kb, len(classes)) if with_f1 else np.zeros_like(acc)
        for into, per_run in zip(out, (acc, f1)):
            into.append((per_run[:, :kv] * sides[0]).sum(1) - (per_run[:, kv:] * sides[1]).sum(1))
    ones = np.ones((1, n), dtype=np.float32)
    f1_all = _macro_f1(ones @ columns, kv + kb, len(classes))[0] if with_f1 else np.zeros(kv + kb)
    observed = ((ones @ correct).astype(np.float64)[0] / n, f1_all)
    points = [float(o[:kv].mean() - o[kv:].mean()) for o in observed]
    return points[0], points[1], np.concatenate(out[0]), np.concatenate(out[1])


def bootstrap_blocks(
    blocks: Sequence[Block], *, resamples: int = RESAMPLES, seed: int = SEED, with_f1: bool = True
) -> tuple[Interval, Interval, float]:
    """The paired bootstrap over one or more blocks (see the module docstring): within each block,
    images and each side's runs are drawn with replacement; with several blocks (runs whose seed
    chose their test images: each seed's pair is a block), the blocks are drawn with replacement
    too, and a side's figure is the mean over the drawn blocks.

    Returns:
        (accuracy difference, macro-F1 difference, two-sided p of the accuracy difference); without
        `with_f1` (the verdict reads accuracy only: benchmarks/significance.py) the macro-F1 one is 0.
    """
    rng = np.random.default_rng(seed)
    per_block = [_block_draws(rng, b, resamples, with_f1) for b in blocks]
    acc_draws = np.stack([b[2] for b in per_block], axis=1)  # (draws, blocks)
    f1_draws = np.stack([b[3] for b in per_block], axis=1)
    mix = _seed_weights(rng, len(blocks), resamples)
    acc_d, f1_d = (acc_draws * mix).sum(1), (f1_draws * mix).sum(1)
    intervals = []
    for draws, point in ((acc_d, np.mean([b[0] for b in per_block])), (f1_d, np.mean([b[1] for b in per_block]))):
        low, high = np.percentile(draws, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
        intervals.append(Interval(float(point), float(low), float(high)))
    tail = min(int((acc_d <= 0).sum()), int((acc_d >= 0).sum()))
    p = min(1.0, 2 * (tail + 1) / (resamples + 1))
    return intervals[0], intervals[1], p


def bootstrap(
    y_true: Sequence[int],
    pred_variant: Sequence[Sequence[int]],
    pred_baseline: Sequence[Sequence[int]],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[Interval, Interval, float]:
    """`bootstrap_blocks` of one block: every run of both sides evaluated on the same images.

    Args:
        y_true: each image's class (n,). pred_variant, pred_baseline: each run's predicted
            classes, (runs, n) a side (or (n,) for one run).
    """
    block = Block(np.asarray(y_true), np.atleast_2d(pred_variant), np.atleast_2d(pred_baseline))
    return bootstrap_blocks([block], resamples=resamples, seed=seed)


def mcnemar(correct_variant: Sequence[bool], correct_baseline: Sequence[bool]) -> tuple[float, int, int]:
    """McNemar's exact test: (p, b, c), b the images only the baseline gets right, c those only
    the variant gets right; p is scipy's two-sided binomial test of c in b + c at 1/2 (1 when b + c = 0)."""
    from scipy.stats import binomtest

    v, b_ = np.asarray(correct_variant, bool), np.asarray(correct_baseline, bool)
    b, c = int((b_ & ~v).sum()), int((v & ~b_).sum())
    return (1.0 if b + c == 0 else float(binomtest(c, b + c, 0.5).pvalue)), b, c


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p values becomes
    max over j <= i of min(1, (m - j + 1) * p_(j)) (j from 1), in the order given."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(estimate: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """ "better" / "worse" when the adjusted p is below `alpha` (the difference's sign decides),
    else "not distinguishable from the baseline at this sample size"."""
    if p_adjusted < alpha and estimate != 0:
        return BETTER if estimate > 0 else WORSE
    return UNDECIDED


def more_needed(estimate: float, half: float, n: int) -> int | None:
    """How many (seeds or images) in all would bring the interval's half-width `half`, taken to
    shrink as 1/sqrt(n), down to |estimate|: ceil(n * (half / |estimate|)^2); None without a difference."""
    if estimate == 0 or not math.isfinite(estimate) or half <= 0:
        return None
    return max(n, math.ceil(n * (half / abs(estimate)) ** 2))


# --------------------------------------------------------------------------- pairs against a baseline
@dataclass(frozen=True)
class Pair:
    """One variant against the baseline.

    test: ``mcnemar`` (one run a side) or ``bootstrap``; p: its p value, p_holm: Holm-adjusted over
    every comparison against the baseline. more: for an undecided pair, (how many in all, of what)
    would resolve a difference of this size, else None. discordant: McNemar's (b, c).
    """

    variant: str
    baseline: str
    seeds: tuple[int, int]
    images: int
    accuracy: Interval
    macro_f1: Interval
    test: str
    p: float
    p_holm: float
    verdict: str
    more: tuple[int, str] | None
    discordant: tuple[int, int] | None

    @property
    def short(self) -> str:
        """The verdict in a table cell: ``better``, ``worse``, ``not distinguishable (~12 seeds)``."""
        if self.verdict != UNDECIDED:
            return self.verdict
        return "not distinguishable" + (f" (~{self.more[0]} {self.more[1]})" if self.more else "")

    def sentence(self) -> str:
        """The verdict in words, with what would resolve an undecided pair; with one run a side, a
        reminder that it compares two trained models, not two recipes (seeds vary too)."""
        text = f"{self.verdict} than {self.baseline}" if self.verdict != UNDECIDED else f"{UNDECIDED} ({self.baseline})"
        if self.verdict == UNDECIDED and self.more:
            count, what = self.more
            per = " a side" if what == "seeds" else ""
            text += f"; about {count} {what}{per} in all would resolve a difference of this size"
        if self.test == "mcnemar":
            text += "; one run a side: these two trained models, not their recipes (another seed may differ)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "baseline": self.baseline,
            "seeds": list(self.seeds),
            "images": self.images,
            "accuracy_difference": self.accuracy.to_dict(),
            "macro_f1_difference": self.macro_f1.to_dict(),
            "test": self.test,
            "p": self.p,
            "p_holm": self.p_holm,
            "verdict": self.verdict,
            "verdict_text": self.sentence(),
            "would_resolve": None if self.more is None else {"count": self.more[0], "of": self.more[1]},
            "discordant": None
            if self.discordant is None
            else {"baseline_only": self.discordant[0], "variant_only": self.discordant[1]},
        }


@dataclass(frozen=True)
class Evaluated:
    """One run's predictions on the images it was evaluated on. images: a digest of the (id, true
    class) pairs in order, equal exactly when two runs were scored on the same images."""

    run_dir: Path
    name: str
    images: str
    y_true: np.ndarray
    predicted: np.ndarray


def _blocks(variant: str, runs: Sequence[Evaluated], baseline: str, base: Sequence[Evaluated]) -> list[Block]:
    """The variant's and the baseline's runs grouped by the images they were scored on; every group
    needs runs of both sides (runs are paired by their images, never across different ones)."""
    mine: dict[str, list[Evaluated]] = {}
    theirs: dict[str, list[Evaluated]] = {}
    for side, into in ((runs, mine), (base, theirs)):
        for r in side:
            into.setdefault(r.images, []).append(r)
    alone = [(r, baseline) for k, g in mine.items() if k not in theirs for r in g]
    alone += [(r, variant) for k, g in theirs.items() if k not in mine for r in g]
    if alone:
        run, other = alone[0]
        raise UsageError(
            f"{run.name} was evaluated on images that no run of {other} was evaluated on",
            origin=Origin.path(run.run_dir),
            found=", ".join(f"{r.name} ({r.images[:12]})" for r, _ in alone),
            expected="runs compared on the same images: the same test split (its fingerprint), or for "
            "splits carved by the seed, a run of each side with that seed",
            hint="train the missing seed for the other variant, or evaluate every run on one --data folder",
        )
    return [
        Block(g[0].y_true, np.stack([r.predicted for r in g]), np.stack([r.predicted for r in theirs[k]]))
        for k, g in mine.items()
    ]


def compare_pairs(
    evaluated: Mapping[str, Sequence[Evaluated]],
    baseline: str,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    with_f1: bool = True,
) -> dict[str, Pair]:
    """Every variant of `evaluated` (label -> its runs' predictions) against `baseline`,
    Holm-adjusted over those comparisons; each bootstrap starts from the same `seed`
    (`with_f1`: see `bootstrap_blocks`).

    Raises:
        UsageError: a run evaluated on images that no run of the other side was evaluated on.
    """
    base = evaluated[baseline]
    raw: dict[str, tuple] = {}
    for label, runs in evaluated.items():
        if label == baseline:
            continue
        blocks = _blocks(label, runs, baseline, base)
        acc, f1, p = bootstrap_blocks(blocks, resamples=resamples, seed=seed, with_f1=with_f1)
        discordant, test = None, "bootstrap"
        if len(blocks) == 1 and len(blocks[0].variant) == 1 and len(blocks[0].baseline) == 1:
            b = blocks[0]
            p, *counts = mcnemar(b.variant[0] == b.y_true, b.baseline[0] == b.y_true)
            discordant, test = tuple(counts), "mcnemar"
        raw[label] = (len(runs), blocks, acc, f1, test, p, discordant)
    adjusted = holm([r[5] for r in raw.values()])
    pairs = {}
    for (label, (k, blocks, acc, f1, test, p, discordant)), p_holm in zip(raw.items(), adjusted):
        said = verdict(acc.estimate, p_holm)
        more = None
        if said == UNDECIDED:
            images = sum(len(b.y_true) for b in blocks)
            several = max(k, len(base)) > 1
            count = more_needed(acc.estimate, acc.half, max(k, len(base)) if several else images)
            more = None if count is None else (count, "seeds" if several else "images")
        pairs[label] = Pair(
            label,
            baseline,
            (k, len(base)),
            sum(len(b.y_true) for b in blocks) // len(blocks),
            acc,
            f1,
            test,
            p,
            p_holm,
            said,
            more,
            discordant,
        )
    return pairs


# --------------------------------------------------------------------------- from the runs
@dataclass(frozen=True)
class Significance:
    """The paired comparison of a set of variants, from their runs' evaluations on `split`.

    pairs: each variant against the baseline; to_best: each variant against the best (the highest
    mean accuracy on `split`), for the tie marks; accuracy: each variant's mean accuracy on `split`.
    """

    split: str
    baseline: str
    best: str
    pairs: dict[str, Pair]
    to_best: dict[str, Pair]
    accuracy: dict[str, float]
    resamples: int
    seed: int

    def rank(self, label: str) -> str:
        """``1`` for the best, ``tied`` for a variant not distinguishable from it, else its place by
        mean accuracy among the variants."""
        if label == self.best:
            return "1"
        if self.to_best[label].verdict == UNDECIDED:
            return "tied"
        order = sorted(self.accuracy, key=lambda k: -self.accuracy[k])
        return str(order.index(label) + 1)

    def cells(self, label: str) -> list[str]:
        """rank, accuracy on the split, Δ accuracy [95%], Δ macro-F1 [95%], p (Holm), verdict."""
        head = [self.rank(label), f"{self.accuracy[label]:.4f}"]
        if label == self.baseline:
            return [*head, "baseline", "", "", ""]
        pair = self.pairs[label]
        return [*head, pair.accuracy.format(), pair.macro_f1.format(), f"{pair.p_holm:.3g} ({pair.test})", pair.short]

    def note(self) -> str:
        """One line under a table: what the columns are."""
        m = len(self.pairs)
        return (
            f"Δ: variant minus {self.baseline} on the same {self.split} images, 95% paired bootstrap interval "
            f"({self.resamples} resamples, seed {self.seed}); p: McNemar (one run a side) or bootstrap, "
            f"Holm-adjusted over {m} comparison{'s' if m != 1 else ''}; tied: not distinguishable from the best."
        )

    def procedure(self) -> str:
        """How every figure of the comparison was computed, in words (the page states it)."""
        return PROCEDURE.format(resamples=self.resamples, seed=self.seed)

    def sentences(self) -> list[tuple[str, str]]:
        """(variant, its verdict in words) for every variant but the baseline."""
        return [(label, pair.sentence()) for label, pair in self.pairs.items()]

    def headers(self) -> list[str]:
        return [
            "rank",
            f"{self.split} acc",
            f"Δ acc vs {self.baseline} [95% CI]",
            "Δ macro-F1 [95% CI]",
            "p (Holm)",
            "verdict",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "baseline": self.baseline,
            "best": self.best,
            "resamples": self.resamples,
            "seed": self.seed,
            "alpha": ALPHA,
            "procedure": self.procedure(),
            "accuracy": self.accuracy,
            "rank": {k: self.rank(k) for k in self.accuracy},
            "pairs": [p.to_dict() for p in self.pairs.values()],
        }


PROCEDURE = (
    "Differences are variant minus baseline on the same held-out images, from each run's "
    "eval/<split>/predictions.jsonl. 95% interval: paired bootstrap percentile interval ({resamples} "
    "resamples, numpy default_rng seed {seed}) drawing the images with replacement (the same for both sides) "
    "and each side's seeds with replacement (when the seed chose the split, each seed's pair of runs is a "
    "block and the blocks are drawn). p: McNemar's exact test when each side has one run, else the "
    "bootstrap's two-sided p; Holm-adjusted over the comparisons against the baseline. Verdict: better or "
    "worse when the adjusted p < 0.05, else not distinguishable at this sample size, with the seeds or "
    "images n(h/|d|)^2 at which the interval's half-width h would reach the difference d. Tied: not "
    "distinguishable from the best variant by the same test."
)


def _digest(ids: Sequence[Any], labels: Sequence[str], recorded: Any) -> str:
    import hashlib

    digest = hashlib.sha256(str(recorded).encode())
    for identity, label in zip(ids, labels):
        digest.update(f"{identity}\t{label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _evaluated(run: Any, name: str, split: str, rows: list[dict[str, Any]], vocab: dict[str, int]) -> Evaluated:
    splits = run.require_splits() or {}
    record = splits.get(split) if isinstance(splits.get(split), dict) else {}
    ids = [r.get("path", r.get("index")) for r in rows]
    true = [str(r["true"]) for r in rows]
    for label in true + [str(r["predicted"]) for r in rows]:
        vocab.setdefault(label, len(vocab))
    return Evaluated(
        run_dir=run.path,
        name=name,
        images=_digest(ids, true, record.get("fingerprint")),
        y_true=np.array([vocab[t] for t in true], dtype=np.int64),
        predicted=np.array([vocab[str(r["predicted"])] for r in rows], dtype=np.int64),
    )


def evaluate_command_for(run: Any) -> str:
    """The `surgery evaluate` command that gives `run` the predictions a comparison reads."""
    splits = run.require_splits() or {}
    test = splits.get("test")
    split = "test" if splits == {} or (isinstance(test, dict) and test.get("images")) else "val"
    return f"surgery evaluate {run.path} --split {split}"


def _split(runs: Sequence[Any]) -> str | None:
    """test when every run has its predictions on it, else val when every run has, else None
    (no run has any: the caller says which commands would), else an error naming each run to evaluate."""
    has = {s: [r.path.joinpath("eval", s, "predictions.jsonl").is_file() for r in runs] for s in ("test", "val")}
    for split in ("test", "val"):
        if all(has[split]):
            return split
    if not any(has["test"]) and not any(has["val"]):
        return None
    split = "test" if sum(has["test"]) >= sum(has["val"]) else "val"
    missing = [r for r, ok in zip(runs, has[split]) if not ok]
    raise UsageError(
        f"{len(missing)} of the {len(runs)} runs have no predictions on the {split} split to compare",
        origin=Origin.path(missing[0].path),
        found=", ".join(str(r.path) for r in missing),
        expected=f"every run evaluated on the same images (eval/{split}/predictions.jsonl)",
        hint="run " + "; ".join(f"`surgery evaluate {r.path} --split {split}`" for r in missing),
    )


def _baseline(variants: Sequence[Any], given: str | None, accuracy: Mapping[str, float]) -> str:
    """`--baseline`: a variant's label, or one of its runs (a folder or a run name); by default the
    only variant without surgery, else the variant with the highest mean accuracy."""
    if given is None:
        plain = [v.label for v in variants if not v.runs[0].spec.get("surgery")]
        return plain[0] if len(plain) == 1 else max(accuracy, key=lambda k: accuracy[k])
    for v in variants:
        if given == v.label or any(given == r.name for r in v.runs):
            return v.label
    target = Path(given).resolve()
    for v in variants:
        if any(r.run_dir.resolve() == target for r in v.runs):
            return v.label
    from ..errors import did_you_mean

    labels = [v.label for v in variants]
    raise UsageError(
        "the baseline is neither a variant nor one of the runs compared",
        origin=Origin.flag("--baseline", given),
        found=given,
        expected="one of the variants: " + ", ".join(labels) + " (or one of their run folders or names)",
        hint=did_you_mean(given, labels + [r.name for v in variants for r in v.runs]),
    )


def significance(
    variants: Sequence[Any],
    *,
    baseline: str | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Significance | None:
    """The paired comparison of `variants` (`surgery.pages.compare.VariantRow`s) from their runs'
    predictions; None when no run has been evaluated (`evaluate_command_for` says how).

    Raises:
        UsageError: some runs evaluated and others not (each named with its command), runs evaluated
            on different images, a baseline that is no variant, fewer than two variants.
    """
    from ..runs import open_run

    runs = {r.run_dir: open_run(r.run_dir, hint=None) for v in variants for r in v.runs}
    split = _split(list(runs.values()))
    if split is None:
        if baseline is not None:
            raise UsageError(
                "--baseline needs the runs' predictions, and no run has been evaluated",
                origin=Origin.flag("--baseline", baseline),
                found="no eval/test or eval/val predictions.jsonl in any run",
                expected="every run evaluated on the same images",
                hint="run " + "; ".join(f"`{evaluate_command_for(r)}`" for r in runs.values()),
            )
        return None
    vocab: dict[str, int] = {}
    evaluated = {
        v.label: [
            _evaluated(runs[r.run_dir], r.name, split, runs[r.run_dir].require_predictions(split), vocab)
            for r in v.runs
        ]
        for v in variants
    }
    accuracy = {k: float(np.mean([np.mean(e.predicted == e.y_true) for e in es])) for k, es in evaluated.items()}
    if len(variants) < 2:
        raise UsageError(
            "a paired comparison needs at least two variants",
            origin=Origin.flag("--baseline", baseline) if baseline else Origin.path(variants[0].runs[0].run_dir),
            found=f"one variant, {variants[0].label}" if variants else "no variant",
            expected="runs of two or more variants",
        )
    chosen = _baseline(variants, baseline, accuracy)
    best = max(accuracy, key=lambda k: accuracy[k])
    pairs = compare_pairs(evaluated, chosen, resamples=resamples, seed=seed)
    to_best = pairs if best == chosen else compare_pairs(evaluated, best, resamples=resamples, seed=seed)
    return Significance(split, chosen, best, pairs, to_best, accuracy, resamples, seed)
