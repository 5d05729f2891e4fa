"""ib_score: Eq. IB and Eq. MC of METHOD.md section 3, by hand, by identity and by sampling."""
import itertools
import math
import random

import numpy as np
import pytest
import torch

from ib_score import closed_form, cov_eta, mc_terms, monte_carlo, terms


def rand_case(rng, k=None):
    """Random (p, q, beta): p ~ Dirichlet(1), q ~ U[0, 1], beta ~ U(0.1, 10)."""
    k = k or rng.randint(1, 6)
    w = [rng.expovariate(1.0) for _ in range(k)]
    p = [x / sum(w) for x in w]
    return p, [rng.random() for _ in range(k)], rng.uniform(0.1, 10.0)


def h2(p):
    return 1.0 - sum(x * x for x in p)


# ---- hand-computed values ------------------------------------------------------------

def test_closed_form_equal_p():
    # qbar = 0.5, r = (2, 0), 1 + 1/beta = 1.2
    # J = 1 + 5 * (0.25 * (2 - 1.2) + 0.25 * (0 - 1.2)) = 1 + 5 * (0.2 - 0.3) = 0.5
    # exploration = 1 - 0.5 = 0.5; exploitation = 5 * (0.25 * 1 + 0.25 * (-1)) = 0
    assert closed_form([0.5, 0.5], [1, 0], 5) == pytest.approx(0.5, abs=1e-12)
    assert terms([0.5, 0.5], [1, 0], 5) == pytest.approx((0.5, 0.0), abs=1e-12)


def test_closed_form_unequal_p_rewards_confidence_in_the_right_step():
    # p = (0.75, 0.25), q = (1, 0): qbar = 0.75, r = (4/3, 0), sum p^2 = 0.625
    # exploration = 0.375; exploitation = 5 * (0.5625 * 1/3 + 0.0625 * (-1)) = 0.625
    # J = 1 + 5 * (0.5625 * (4/3 - 1.2) + 0.0625 * (-1.2)) = 1 + 5 * (0.075 - 0.075) = 1.0
    assert closed_form([0.75, 0.25], [1, 0], 5) == pytest.approx(1.0, abs=1e-12)
    assert terms([0.75, 0.25], [1, 0], 5) == pytest.approx((0.375, 0.625), abs=1e-12)
    # p = (0.25, 0.75): qbar = 0.25, r = (4, 0)
    # exploitation = 5 * (0.0625 * 3 + 0.5625 * (-1)) = -1.875; J = 0.375 - 1.875 = -1.5
    assert closed_form([0.25, 0.75], [1, 0], 5) == pytest.approx(-1.5, abs=1e-12)
    assert terms([0.25, 0.75], [1, 0], 5) == pytest.approx((0.375, -1.875), abs=1e-12)


def test_closed_form_three_steps():
    # p = (0.5, 0.25, 0.25), q = (0.8, 0.4, 0), beta = 2: qbar = 0.4 + 0.1 = 0.5,
    # r = (1.6, 0.8, 0), 1 + 1/beta = 1.5, sum p^2 = 0.375
    # J = 1 + 2 * (0.25 * 0.1 + 0.0625 * (-0.7) + 0.0625 * (-1.5)) = 1 - 0.225 = 0.775
    # exploitation = 2 * (0.25 * 0.6 + 0.0625 * (-0.2) + 0.0625 * (-1)) = 0.15
    assert closed_form([0.5, 0.25, 0.25], [0.8, 0.4, 0.0], 2) == pytest.approx(0.775, abs=1e-12)
    assert terms([0.5, 0.25, 0.25], [0.8, 0.4, 0.0], 2) == pytest.approx((0.625, 0.15), abs=1e-12)


def test_monte_carlo_by_hand():
    # V(c) = (1, 0.5, 0), V(n) = 0.5, eta2 = (0.6, 0.3, 0.2), beta = 5
    # r = (2, 1, 0), eta1 = r - 1.2 = (0.8, -0.2, -1.2)
    # J = 1 + 5/3 * (0.48 - 0.06 - 0.24) = 1 + 5/3 * 0.18 = 1.3
    # exploration = 1 - 1.1/3; exploitation = 5/3 * (1 * 0.6 + 0 * 0.3 - 1 * 0.2) = 2/3
    # Cov: r - mean r = (1, 0, -1), eta2 - mean = (0.6, 0.3, 0.2) - 11/30
    #      -> (7/30 + 0 + 5/30) / 3 = 2/15
    args = ([1.0, 0.5, 0.0], 0.5, [0.6, 0.3, 0.2], 5)
    assert monte_carlo(*args) == pytest.approx(1.3, abs=1e-12)
    assert mc_terms(*args) == pytest.approx((1 - 1.1 / 3, 2 / 3), abs=1e-12)
    assert cov_eta(*args) == pytest.approx(2 / 15, abs=1e-12)


# ---- the Tsallis-2 identity ------------------------------------------------------------

def test_identity_needs_the_cross_form_of_the_conditional():
    # Eq. IB = (beta + 1) H2(S) - beta H2(S | a*) holds with the cross form
    #   H2(S | a*) = sum_k p(k | a*) (1 - p_k) = 1 - sum_k p_k^2 r_k,  p(k | a*) = p_k r_k:
    # the prior's Tsallis-2 surprisal ln2(1/p_k) = 1 - p_k averaged under the posterior.
    rng = random.Random(0)
    for _ in range(300):
        p, q, beta = rand_case(rng)
        qbar = sum(a * b for a, b in zip(p, q))
        if qbar == 0:
            continue
        post = [a * b / qbar for a, b in zip(p, q)]
        cross = sum(pk_post * (1 - pk) for pk_post, pk in zip(post, p))
        assert cross == pytest.approx(1 - sum(pk * pk * qk / qbar for pk, qk in zip(p, q)), abs=1e-12)
        assert (beta + 1) * h2(p) - beta * cross == pytest.approx(closed_form(p, q, beta), abs=1e-9)


def test_identity_fails_with_the_posteriors_own_entropy():
    # H2(posterior) = 1 - sum (p_k r_k)^2 gives 1 + beta sum p^2 (r^2 - 1 - 1/beta), not Eq. IB.
    # p = (0.5, 0.5), q = (1, 0): posterior (1, 0), H2 = 0 -> 6 * 0.5 - 0 = 3, but J = 0.5
    assert (5 + 1) * h2([0.5, 0.5]) - 5 * h2([1.0, 0.0]) == pytest.approx(3.0)
    assert closed_form([0.5, 0.5], [1, 0], 5) == pytest.approx(0.5)
    # they agree only when r^2 = r on the support (q_k in {0, qbar})


def test_exploitation_is_beta_times_cov_of_p_and_r():
    rng = random.Random(1)
    for _ in range(200):
        p, q, beta = rand_case(rng)
        qbar = sum(a * b for a, b in zip(p, q))
        r = [qk / qbar for qk in q]
        e_p, e_r = sum(pk * pk for pk in p), sum(pk * rk for pk, rk in zip(p, r))
        cov = sum(pk * pk * rk for pk, rk in zip(p, r)) - e_p * e_r  # no E_p[r] = 1 assumed
        explore, exploit = terms(p, q, beta)
        assert explore == pytest.approx(h2(p), abs=1e-12)
        assert exploit == pytest.approx(beta * cov, abs=1e-9)


# ---- the terms add up -----------------------------------------------------------------

def test_terms_add_up_to_closed_form():
    rng = random.Random(2)
    for _ in range(300):
        p, q, beta = rand_case(rng)
        assert sum(terms(p, q, beta)) == pytest.approx(closed_form(p, q, beta), rel=1e-12, abs=1e-12)


def test_mc_terms_add_up_to_monte_carlo_and_cov_decomposes_it():
    rng = random.Random(3)
    for _ in range(300):
        m = rng.randint(1, 8)
        v = [rng.random() for _ in range(m)]
        vn, eta2, beta = rng.random(), [rng.random() for _ in range(m)], rng.uniform(0.1, 10)
        j = monte_carlo(v, vn, eta2, beta)
        assert sum(mc_terms(v, vn, eta2, beta)) == pytest.approx(j, rel=1e-12, abs=1e-12)
        # J = 1 + beta * (Cov(eta1, eta2) + mean eta1 * mean eta2)
        eta1 = [vc / vn - 1 - 1 / beta for vc in v]
        mean1, mean2 = sum(eta1) / m, sum(eta2) / m
        assert 1 + beta * (cov_eta(v, vn, eta2, beta) + mean1 * mean2) == pytest.approx(j, abs=1e-9)
        assert cov_eta(v, vn, eta2, beta) == pytest.approx(cov_eta(v, vn, eta2, 1.0), abs=1e-12)


# ---- Eq. MC is unbiased for Eq. IB --------------------------------------------------------

P, Q, BETA = [0.4, 0.3, 0.2, 0.1], [0.9, 0.2, 0.5, 0.0], 5.0
QBAR = sum(a * b for a, b in zip(P, Q))


def _mc_all(ks):
    args = ([Q[k] for k in ks], QBAR, [P[k] for k in ks], BETA)
    return (monte_carlo(*args), *mc_terms(*args))


def test_mc_expectation_is_exactly_closed_form():
    # Sum over all K^m ordered child tuples, weighted by their probability: no sampling noise.
    for m in (1, 2, 3):
        expect = [0.0, 0.0, 0.0]
        for ks in itertools.product(range(len(P)), repeat=m):
            w = math.prod(P[k] for k in ks)
            expect = [e + w * x for e, x in zip(expect, _mc_all(ks))]
        want = (closed_form(P, Q, BETA), *terms(P, Q, BETA))
        assert expect == pytest.approx(want, abs=1e-12)


def test_mc_converges_to_closed_form_within_4_standard_errors():
    want = (closed_form(P, Q, BETA), *terms(P, Q, BETA))
    for seed in range(3):
        rng = random.Random(seed)
        samples = [_mc_all(rng.choices(range(len(P)), weights=P, k=4)) for _ in range(4000)]
        for i in range(3):
            xs = [s[i] for s in samples]
            mean = sum(xs) / len(xs)
            se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
            assert abs(mean - want[i]) < 4 * se, (seed, i, mean, want[i], se)


def test_mc_fixed_seed_many_children():
    # One node with 100k i.i.d. children: per-child std of J is 0.97, SE = 0.003; 0.015 is ~5 SE.
    ks = random.Random(12345).choices(range(len(P)), weights=P, k=100_000)
    got = _mc_all(ks)
    want = (closed_form(P, Q, BETA), *terms(P, Q, BETA))
    assert got == pytest.approx(want, abs=0.015)


# ---- edge cases ------------------------------------------------------------------------

def test_one_child():
    # r = 1/0.5 = 2, eta1 = 0.8, J = 1 + 5 * 0.8 * 0.4 = 2.6
    assert monte_carlo([1.0], 0.5, [0.4], 5) == pytest.approx(2.6)
    assert mc_terms([1.0], 0.5, [0.4], 5) == pytest.approx((0.6, 2.0))
    assert cov_eta([1.0], 0.5, [0.4], 5) == 0.0


def test_parent_value_zero_uses_ratio_guard():
    # r = 1 for every child, so J = 1 + beta * mean(-1/beta * eta2) = 1 - mean eta2 = 0.6
    for v in ([0.0, 0.0], [0.5, 0.0]):
        assert monte_carlo(v, 0.0, [0.3, 0.5], 5) == pytest.approx(0.6)
        assert mc_terms(v, 0.0, [0.3, 0.5], 5) == pytest.approx((0.6, 0.0))
        assert cov_eta(v, 0.0, [0.3, 0.5], 5) == 0.0


def test_all_children_correct_or_all_wrong():
    eta2 = [0.9, 0.2, 0.4]
    # all correct: V(c) = V(n) = 1, r = 1 -> J = 1 - mean eta2 = 1 - 0.5
    assert monte_carlo([1, 1, 1], 1.0, eta2, 5) == pytest.approx(0.5)
    assert mc_terms([1, 1, 1], 1.0, eta2, 5) == pytest.approx((0.5, 0.0))
    # all wrong: V = 0 everywhere -> ratio guard, same value
    assert monte_carlo([0, 0, 0], 0.0, eta2, 5) == pytest.approx(0.5)
    assert cov_eta([0, 0, 0], 0.0, eta2, 5) == 0.0


def test_closed_form_qbar_zero_uses_ratio_guard():
    # qbar = 0 -> r = 1 -> J = 1 - sum p^2, exploitation 0
    assert closed_form([0.5, 0.5], [0, 0], 5) == pytest.approx(0.5)
    assert terms([0.5, 0.5], [0, 0], 5) == (0.5, 0.0)
    assert closed_form([1.0, 0.0], [0.0, 1.0], 5) == pytest.approx(0.0)  # the good step has p = 0


def test_single_candidate_and_zero_probability_steps():
    assert closed_form([1.0], [0.3], 5) == pytest.approx(0.0)  # r = 1, sum p^2 = 1
    # p = 0 steps contribute nothing, whatever their q
    assert closed_form([0.5, 0.5, 0.0], [1, 0, 1], 5) == pytest.approx(closed_form([0.5, 0.5], [1, 0], 5))


# ---- bad input -------------------------------------------------------------------------

NAN = float("nan")
GOOD_MC = dict(child_values=[1.0, 0.0], parent_value=0.5, step_probs=[0.5, 0.2], beta=5.0)


@pytest.mark.parametrize("p, q, beta, match", [
    ([1.0, 0.5, -0.5], [1, 0, 0], 5, r"p\[2\] = -0.5 is outside \[0, 1\]"),
    ([0.5, 0.4], [1, 0], 5, r"p must sum to 1"),
    ([0.5, 0.5], [1.2, 0], 5, r"q\[0\] = 1.2 is outside"),
    ([0.5, 0.5], [-0.1, 0], 5, r"q\[0\]"),
    ([NAN, 1.0], [1, 0], 5, r"p\[0\] is NaN"),
    ([0.5, 0.5], [1, NAN], 5, r"q\[1\] is NaN"),
    ([0.5, 0.5], [1, 0], NAN, r"beta"),
    ([0.5, 0.5], [1, 0, 1], 5, r"p and q differ in length"),
    ([], [], 5, r"p is empty"),
    ([1.0], [], 5, r"q is empty"),
    ([0.5, 0.5], [1, 0], 0, r"beta must be .* > 0"),
    ([0.5, 0.5], [1, 0], -1, r"beta"),
    ([0.5, 0.5], [1, 0], math.inf, r"beta"),
    (torch.full((2, 2), 0.25), [1, 0], 5, r"p must be 1-D"),
    (torch.tensor(1.0), [1], 5, r"p must be 1-D"),
])
def test_closed_form_rejects(p, q, beta, match):
    for fn in (closed_form, terms):
        with pytest.raises(ValueError, match=match):
            fn(p, q, beta)


@pytest.mark.parametrize("change, match", [
    (dict(child_values=[1.5, 0.0]), r"child_values\[0\] = 1.5 is outside"),
    (dict(child_values=[NAN, 0.0]), r"child_values\[0\] is NaN"),
    (dict(parent_value=1.5), r"parent_value = 1.5 is outside"),
    (dict(parent_value=-0.5), r"parent_value"),
    (dict(parent_value=NAN), r"parent_value is NaN"),
    (dict(step_probs=[0.5, -0.2]), r"step_probs\[1\]"),
    (dict(step_probs=[0.5, NAN]), r"step_probs\[1\] is NaN"),
    (dict(step_probs=[0.5]), r"child_values and step_probs differ in length"),
    (dict(child_values=[], step_probs=[]), r"child_values is empty"),
    (dict(beta=0.0), r"beta"),
    (dict(beta=-2.0), r"beta"),
])
def test_monte_carlo_rejects(change, match):
    for fn in (monte_carlo, mc_terms, cov_eta):
        with pytest.raises(ValueError, match=match):
            fn(**{**GOOD_MC, **change})


def test_p_sum_tolerance():
    closed_form([0.5 + 4e-7, 0.5], [1, 0], 5)  # within 1e-6: accepted
    with pytest.raises(ValueError, match="p must sum to 1"):
        closed_form([0.5 + 4e-6, 0.5], [1, 0], 5)


# ---- input types -----------------------------------------------------------------------

@pytest.mark.parametrize("conv", [list, tuple, np.array, torch.tensor,
                                  lambda x: torch.tensor(x, dtype=torch.float32)])
def test_accepts_sequences_arrays_and_tensors(conv):
    p, q = [0.5, 0.25, 0.25], [0.8, 0.4, 0.0]
    got = closed_form(conv(p), conv(q), 2)
    assert type(got) is float and got == pytest.approx(0.775, abs=1e-6)
    assert terms(conv(p), conv(q), 2) == pytest.approx((0.625, 0.15), abs=1e-6)
    v, eta2 = [1.0, 0.5, 0.0], [0.6, 0.3, 0.2]
    got = monte_carlo(conv(v), torch.tensor(0.5), conv(eta2), torch.tensor(5.0))
    assert type(got) is float and got == pytest.approx(1.3, abs=1e-6)
    assert mc_terms(conv(v), np.float64(0.5), conv(eta2), 5) == pytest.approx((1 - 1.1 / 3, 2 / 3), abs=1e-6)
    assert type(cov_eta(conv(v), 0.5, conv(eta2), 5)) is float
