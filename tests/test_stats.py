"""The statistics on known answers: each number checked against an independent calculation
(a closed form, math.comb, a printed table), not against scipy again."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import stats

N = 1000  # test images in the McNemar cases


def test_a_confidence_interval_on_fixed_numbers() -> None:
    """mean 0.95, sd 0.0158 over 5 seeds; t(0.975, 4) = 2.776 from any table of the t distribution."""
    s = stats.summarize([0.95, 0.96, 0.97, 0.94, 0.93])
    sd = (0.001 / 4) ** 0.5  # squared deviations 0, 1, 4, 1, 4 (x 1e-4), over n - 1
    half = 2.776 * sd / 5**0.5
    assert (s.n, s.mean, s.sd) == (5, pytest.approx(0.95), pytest.approx(sd))
    assert s.low == pytest.approx(0.95 - half, abs=1e-5)
    assert s.high == pytest.approx(0.95 + half, abs=1e-5)
    assert stats.summarize([0.9]) == (1, 0.9, None, None, None)  # one run: no interval
    assert stats.summarize([0.9, 0.9]) == (2, 0.9, 0.0, 0.9, 0.9)


def test_a_paired_comparison_with_a_hand_checked_p_value() -> None:
    """Differences 0.01, 0.01, 0.02: mean 1/75, sd 0.00577, t = 4 on 2 degrees of freedom. With 2
    degrees of freedom the t distribution's tail is closed-form: P(|T| > t) = 1 - t / sqrt(2 + t²)."""
    result = stats.paired([0.96, 0.95, 0.97], [0.95, 0.94, 0.95])
    assert result.n == 3 and result.mean == pytest.approx(0.04 / 3)
    assert result.p == pytest.approx(1 - 4 / 18**0.5)  # 0.0572
    half = 4.303 * (0.01 / 3) / 1  # t(0.975, 2) = 4.303; sd / sqrt(3) = 0.00333
    assert result.low == pytest.approx(0.04 / 3 - half, abs=1e-5)
    assert result.high == pytest.approx(0.04 / 3 + half, abs=1e-5)
    assert result.verdict == "not distinguishable from noise"
    real = stats.paired([0.98, 0.97, 0.99], [0.95, 0.94, 0.95])  # 0.03, 0.03, 0.04: t = 10
    assert real.p == pytest.approx(1 - 10 / 102**0.5)  # 0.0099
    assert real.verdict == "real at 95 %"


def test_identical_readouts_and_too_few_pairs_say_so_instead_of_a_p_value() -> None:
    same = stats.paired([0.96, 0.95, 0.97], [0.96, 0.95, 0.97])
    assert same == (3, 0.0, 0.0, 0.0, None, "identical in every seed")
    assert stats.paired([0.96], [0.95]).verdict == "one pair: no test"
    assert stats.paired([], []).verdict == "no seed in common"
    assert stats.paired([0.96, 0.97], [0.95, 0.96]).p is None  # the same gain in both seeds


def test_the_mcnemar_test_and_the_gain_interval_on_a_hand_checked_table() -> None:
    # 1,000 images: 10 right only by the champion (b), 25 only by the challenger (c).
    labels = np.arange(N) % 10
    right_old, right_new = np.zeros(N, bool), np.zeros(N, bool)
    right_old[:900], right_new[:890] = True, True  # 890 right by both
    right_new[900:925] = True
    old, new = (np.where(r, labels, (labels + 3) % 10) for r in (right_old, right_new))
    t = stats.mcnemar(old, new, labels)
    assert (t.n, t.b, t.c) == (1000, 10, 25)
    assert (t.champion, t.challenger, t.gain) == (0.900, 0.915, 0.015)
    # Exact McNemar: c of b + c = 35 discordant images under Binomial(35, 1/2), two-sided; the
    # distribution is symmetric, so twice the lower tail P(X <= 10).
    exact = 2 * sum(math.comb(35, k) for k in range(11)) / 2**35
    assert t.p_value == pytest.approx(exact, rel=1e-12)
    assert t.p_value == pytest.approx(0.0166738, rel=1e-5)
    # Agresti-Min: 1/2 added to each cell, so b = 10.5, c = 25.5 of n = 1002; z = 1.959964.
    d, var = 15 / 1002, (36 - 15**2 / 1002) / 1002**2
    expected = (d - 1.959963984540054 * math.sqrt(var), d + 1.959963984540054 * math.sqrt(var))
    assert t.ci95 == pytest.approx(expected, rel=1e-9)
    assert t.ci95 == pytest.approx((0.0032704, 0.0266697), abs=1e-7)


def test_the_test_of_no_discordant_image_and_of_three_out_of_three() -> None:
    labels = np.arange(N) % 10
    same = stats.mcnemar(labels, labels, labels)
    assert (same.b, same.c, same.p_value, same.gain) == (0, 0, 1.0, 0.0)
    low, high = same.ci95  # still a width: 1/2 in each discordant cell
    assert low == pytest.approx(-high) and high == pytest.approx(1.959964 / 1002, rel=1e-6)
    better = labels.copy()
    worse = better.copy()
    worse[:3] = (labels[:3] + 1) % 10
    assert stats.mcnemar(worse, better, labels).p_value == 0.25  # 2 * (1/2)**3
