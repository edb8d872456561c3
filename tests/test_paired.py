"""`surgery.pages.paired`: the paired bootstrap against a direct computation, McNemar against scipy,
Holm on a known example, verdicts, what would resolve an undecided pair, and determinism."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from surgery.errors import UsageError
from surgery.pages.paired import (
    BETTER,
    UNDECIDED,
    WORSE,
    Evaluated,
    bootstrap,
    compare_pairs,
    holm,
    mcnemar,
    more_needed,
    verdict,
)


def _noisy(y: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """Predictions right on about `accuracy` of the images, a random wrong class elsewhere."""
    wrong = (y + rng.integers(1, 10, len(y))) % 10
    return np.where(rng.random(len(y)) < accuracy, y, wrong)


def test_bootstrap_interval_agrees_with_the_enumerated_distribution() -> None:
    """Six images, one run a side: every one of the 6^6 equally likely resamples enumerated; the
    percentile interval of 40,000 seeded resamples lands on the same atoms (steps of 1/6)."""
    y = np.zeros(6, dtype=int)
    variant = np.array([0, 0, 0, 1, 0, 1])  # right on 4
    base = np.array([1, 0, 1, 1, 1, 0])  # right on 1; per image difference: 1, 0, 1, 0, 1, -1
    d = (variant == y).astype(float) - (base == y)
    means = np.array([d[list(idx)].mean() for idx in itertools.product(range(6), repeat=6)])
    exact_low, exact_high = np.percentile(means, [2.5, 97.5])
    acc, _, p = bootstrap(y, variant, base, resamples=40_000, seed=3)
    assert acc.estimate == pytest.approx(d.mean())
    assert abs(acc.low - exact_low) <= 1 / 6 + 1e-9 and abs(acc.high - exact_high) <= 1 / 6 + 1e-9
    exact_p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    assert p == pytest.approx(exact_p, abs=0.01)


def test_bootstrap_interval_agrees_with_a_direct_loop() -> None:
    """The vectorised resampling against a plain loop over resamples (means, spread) with many images."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 400)
    v, b = _noisy(y, 0.9, rng), _noisy(y, 0.85, rng)
    d = (v == y).astype(float) - (b == y)
    loop = np.array([d[rng.integers(0, 400, 400)].mean() for _ in range(4000)])
    acc, _, _ = bootstrap(y, v, b, resamples=4000, seed=1)
    low, high = np.percentile(loop, [2.5, 97.5])
    assert acc.low == pytest.approx(low, abs=0.006) and acc.high == pytest.approx(high, abs=0.006)


def test_macro_f1_difference_is_scikit_learns() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    v, b = _noisy(y, 0.8, rng) % 5, _noisy(y, 0.7, rng) % 5
    _, f1, _ = bootstrap(y, v, b, resamples=200)
    labels = np.unique(np.concatenate([y, v, b]))
    expected = f1_score(y, v, average="macro", labels=labels, zero_division=0) - f1_score(
        y, b, average="macro", labels=labels, zero_division=0
    )
    assert f1.estimate == pytest.approx(expected) and f1.low < f1.estimate < f1.high


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcnemar_is_scipys_binomial_test(seed: int) -> None:
    rng = np.random.default_rng(seed)
    v, b = rng.random(200) < 0.8, rng.random(200) < 0.7
    p, only_base, only_variant = mcnemar(v, b)
    assert (only_base, only_variant) == (int((b & ~v).sum()), int((v & ~b).sum()))
    assert p == binomtest(only_variant, only_base + only_variant, 0.5).pvalue


def test_mcnemar_without_discordant_images_is_one() -> None:
    same = np.array([True, False, True])
    assert mcnemar(same, same) == (1.0, 0, 0)


def test_holm_on_a_known_example() -> None:
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> kept monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_verdict_words() -> None:
    assert verdict(0.02, 0.01) == BETTER and verdict(-0.02, 0.01) == WORSE
    assert verdict(0.02, 0.2) == UNDECIDED == "not distinguishable from the baseline at this sample size"
    assert verdict(0.0, 0.0) == UNDECIDED


def test_more_needed_scales_with_one_over_sqrt_n() -> None:
    # half-width 0.02 at 5 seeds, difference 0.01: (0.02 / 0.01)^2 = 4 times as many
    assert more_needed(0.01, 0.02, 5) == 20
    assert more_needed(-0.01, 0.02, 1000) == 4000
    assert more_needed(0.0, 0.02, 5) is None


def _runs(y: np.ndarray, preds: list[np.ndarray], name: str, images: str = "same") -> list[Evaluated]:
    return [Evaluated(Path(f"/runs/{name}-s{i}"), f"{name}-s{i}", images, y, p) for i, p in enumerate(preds)]


def test_all_equal_predictions_are_not_distinguishable() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 10, 100)
    p = _noisy(y, 0.8, rng)
    pair = compare_pairs({"a": _runs(y, [p], "a"), "b": _runs(y, [p], "b")}, "b")["a"]
    assert (pair.accuracy.low, pair.accuracy.high, pair.p, pair.verdict) == (0.0, 0.0, 1.0, UNDECIDED)
    assert pair.test == "mcnemar" and pair.discordant == (0, 0) and pair.more is None
    assert "nan" not in pair.accuracy.format().lower()


def test_a_planted_effect_is_found_and_holm_adjusts_across_variants() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 1000)
    base = [_noisy(y, 0.8, rng) for _ in range(3)]
    better = [np.where(rng.random(1000) < 0.5, y, p) for p in base]  # half the mistakes fixed
    worse = [_noisy(y, 0.6, rng) for _ in range(3)]
    same = [_noisy(y, 0.8, rng) for _ in range(3)]
    pairs = compare_pairs(
        {"base": _runs(y, base, "base"), "up": _runs(y, better, "up"), "down": _runs(y, worse, "down"),
         "same": _runs(y, same, "same")},
        "base",
    )  # fmt: skip
    assert (pairs["up"].verdict, pairs["down"].verdict, pairs["same"].verdict) == (BETTER, WORSE, UNDECIDED)
    assert pairs["up"].accuracy.low > 0 > pairs["down"].accuracy.high and pairs["up"].test == "bootstrap"
    assert pairs["same"].p_holm == pytest.approx(holm([pairs[k].p for k in ("up", "down", "same")])[2])
    assert pairs["same"].more is None or pairs["same"].more[1] == "seeds"


def test_the_bootstrap_is_deterministic_given_its_seed() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 10, 300)
    v, b = [_noisy(y, 0.8, rng) for _ in range(3)], [_noisy(y, 0.78, rng) for _ in range(3)]
    assert bootstrap(y, v, b, seed=7) == bootstrap(y, v, b, seed=7)
    assert bootstrap(y, v, b, seed=7)[0] != bootstrap(y, v, b, seed=8)[0]


def test_runs_whose_seed_chose_the_images_are_paired_by_seed() -> None:
    rng = np.random.default_rng(5)
    ys = [rng.integers(0, 10, 200) for _ in range(3)]  # each seed its own test images
    base = [Evaluated(Path(f"/b{i}"), f"b{i}", f"images{i}", y, _noisy(y, 0.7, rng)) for i, y in enumerate(ys)]
    up = [Evaluated(Path(f"/u{i}"), f"u{i}", f"images{i}", y, np.where(rng.random(200) < 0.6, y, b.predicted))
          for i, (y, b) in enumerate(zip(ys, base))]  # fmt: skip
    pair = compare_pairs({"b": base, "u": up}, "b")["u"]
    assert pair.verdict == BETTER and pair.images == 200 and pair.seeds == (3, 3)
    with pytest.raises(UsageError, match="u2 was evaluated on images that no run of b was evaluated on"):
        compare_pairs({"b": base[:2], "u": up}, "b")
