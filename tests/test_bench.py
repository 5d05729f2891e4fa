"""The reproduction's arithmetic: the t interval over seeds and the accuracy read
at a token budget (the long benches themselves are benchmarks, not tests)."""
import math

import pytest

import bench


def test_t_interval_by_hand():
    # mean 2.5, s = sqrt(5/3), t(0.975, 3 df) = 3.182: half-width 3.182 * 1.290994 / 2 = 2.053972
    m, lo, hi = bench.t_interval([1.0, 2.0, 3.0, 4.0])
    assert (m, lo, hi) == pytest.approx((2.5, 0.446028, 4.553972), abs=1e-6)
    m, lo, hi = bench.t_interval([0.1] * 8)  # no spread, no width
    assert lo == hi == pytest.approx(0.1)
    # 8 seeds: t(0.975, 7 df) = 2.365
    values = [0.02, -0.01, 0.05, 0.03, 0.0, 0.04, 0.01, 0.02]
    m, lo, hi = bench.t_interval(values)
    s = math.sqrt(sum((v - 0.02) ** 2 for v in values) / 7)
    assert m == pytest.approx(0.02) and hi - m == pytest.approx(2.365 * s / math.sqrt(8))
    assert math.isnan(bench.t_interval([0.3])[1])


def test_accuracy_at_a_token_budget_is_read_between_evaluations():
    curve = [(0, 0.3), (100, 0.5), (200, 0.9)]
    assert bench.at_tokens(curve, 150) == pytest.approx(0.7)
    assert bench.at_tokens(curve, 100) == pytest.approx(0.5)
    assert bench.at_tokens(curve, 0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="outside the curve"):
        bench.at_tokens(curve, 250)
