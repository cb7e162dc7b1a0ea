"""The statistics behind every comparison: scipy's tests and intervals, in one place.

- summarize: mean, sd and Student-t interval of one configuration's test accuracy over seeds
  (the report's replicate groups).
- paired: two configurations paired by training seed, the paired t-test (the report).
- mcnemar: two models on the same test images, image by image, the exact McNemar test and the
  gain's interval (the register stage's champion gate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

LEVEL = 0.95  # of every confidence interval, and 1 - LEVEL the p-value that counts as real


class Summary(NamedTuple):
    """Test accuracy over the seeds of one group."""

    n: int
    mean: float
    sd: float | None  # None for one run
    low: float | None  # the 95 % interval of the mean; None for one run
    high: float | None


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sd and the Student-t 95 % confidence interval of the mean (scipy.stats.t.interval)."""
    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return Summary(n, mean, None, None, None)
    sd = float(np.std(values, ddof=1))
    if sd == 0:  # t.interval of a zero scale is nan; every seed gave this very value
        return Summary(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(LEVEL, n - 1, loc=mean, scale=sd / np.sqrt(n))
    return Summary(n, mean, sd, float(low), float(high))


class PairedSeeds(NamedTuple):
    """a - b over the seeds both have."""

    n: int
    mean: float | None  # None: no seed in common
    low: float | None
    high: float | None
    p: float | None  # paired t-test (scipy.stats.ttest_rel); None where no test applies
    verdict: str


def paired(a: Sequence[float], b: Sequence[float]) -> PairedSeeds:
    """The paired comparison of a and b (same seed at each index): the mean difference a - b, its
    95 % interval and the two-sided p-value of the paired t-test, and what they say in words."""
    diff = np.subtract(a, b, dtype=np.float64)
    n = len(diff)
    if n == 0:
        return PairedSeeds(0, None, None, None, None, "no seed in common")
    mean = float(diff.mean())
    if not diff.any():
        return PairedSeeds(n, 0.0, 0.0, 0.0, None, "identical in every seed")
    if n < 2:
        return PairedSeeds(n, mean, None, None, None, "one pair: no test")
    if np.all(diff == diff[0]):  # no spread: t is infinite, scipy's p is nan
        return PairedSeeds(
            n, mean, mean, mean, None, f"the same difference in all {n} seeds: no test"
        )
    test = stats.ttest_rel(a, b)
    ci = test.confidence_interval(LEVEL)
    p = float(test.pvalue)
    verdict = "real at 95 %" if p < 1 - LEVEL else "not distinguishable from noise"
    return PairedSeeds(n, mean, float(ci.low), float(ci.high), p, verdict)


def gain_interval(b: int, c: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The interval for the gain in accuracy of paired predictions, (c - b) / n.

    Agresti and Min's (Statistics in Medicine, 2005): the Wald interval of the difference of two
    paired proportions after adding 1/2 to each of the four cells of the 2x2 table, so n + 2 in
    all. Unlike the plain Wald interval it keeps a width when b + c is 0 and covers close to the
    level for small counts. b: right only by the champion, c: right only by the challenger.
    """
    b_, c_, n_ = b + 0.5, c + 0.5, n + 2
    z = float(stats.norm.ppf(0.5 + level / 2))
    d = (c_ - b_) / n_
    half = z * math.sqrt((b_ + c_) - (c_ - b_) ** 2 / n_) / n_
    return d - half, d + half


class McNemar(NamedTuple):
    """Challenger against champion, image by image on the same test images."""

    n: int  # test images
    b: int  # right only by the champion
    c: int  # right only by the challenger
    p_value: float  # exact McNemar: c of the b + c discordant images, against a fair coin
    challenger: float  # accuracies
    champion: float
    gain: float  # challenger - champion = (c - b) / n
    ci95: tuple[float, float]

    def record(self) -> dict:
        """As reports/registry.json holds it."""
        return {
            "test_images": self.n,
            "mcnemar_b": self.b,
            "mcnemar_c": self.c,
            "p_value": self.p_value,
            "challenger_accuracy": self.challenger,
            "champion_accuracy": self.champion,
            "gain": self.gain,
            "gain_ci95": list(self.ci95),
        }


def mcnemar(champion: np.ndarray, challenger: np.ndarray, labels: np.ndarray) -> McNemar:
    """The exact McNemar test and the gain's interval for two models' classes of these images."""
    old, new = champion == labels, challenger == labels
    b, c, n = int(np.sum(old & ~new)), int(np.sum(new & ~old)), len(labels)
    p = float(stats.binomtest(c, b + c, 0.5).pvalue) if b + c else 1.0
    accuracies = float(new.mean()), float(old.mean())
    return McNemar(n, b, c, p, *accuracies, (c - b) / n, gain_interval(b, c, n))
