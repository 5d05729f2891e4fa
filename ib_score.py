"""IB-Score: the Information Bottleneck score of the next step (METHOD.md section 3).

For the next step S after a prefix, with target a* (the correct answer),

    J = (beta + 1) * H2(S | prefix) - beta * H2(S | a*, prefix),
    H2(p) = 1 - sum_k p_k^2                          (Tsallis entropy of order 2).

Closed form, Eq. IB (K candidate steps, p_k = pi(k | prefix), q_k = p(a* | k)):

    qbar = sum_k p_k q_k,   r_k = q_k / qbar
    J    = 1 + beta * sum_k p_k^2 (r_k - 1 - 1/beta)
         = (1 - sum_k p_k^2) + beta * Cov_{k~p}(p_k, r_k)      (E_p[r] = 1)
           exploration          exploitation

Tsallis-2 derivation in short. Write ln2(x) = 1 - 1/x, so H2(p) = E_p[ln2(1/p_k)]
= 1 - sum p_k^2. Take H2(S | a*) as the same surprisal ln2(1/p_k) = 1 - p_k
averaged under the posterior p(k | a*) = p_k q_k / qbar = p_k r_k:
H2(S | a*) = 1 - sum_k p_k^2 r_k. Then
(beta + 1)(1 - sum p^2) - beta(1 - sum p^2 r) = 1 + beta sum p^2 (r - 1 - 1/beta),
which is Eq. IB exactly. The "own" Tsallis-2 entropy of the posterior,
1 - sum_k (p_k r_k)^2, gives r_k^2 in place of r_k and does NOT reproduce Eq. IB
(tests/test_ib_score.py checks both statements).

Monte Carlo form, Eq. MC, over the m children c of a tree node n:

    r_c    = V(c) / V(n)
    eta1_c = r_c - (1 + 1/beta)
    eta2_c = pi(c | prefix(n))
    J(n)   = 1 + (beta / m) sum_c eta1_c eta2_c
           = (1 - mean_c eta2_c) + beta * mean_c (r_c - 1) eta2_c
             exploration            exploitation

With children drawn i.i.d. from p, eta2 = p_k, V(c) = q_k and V(n) = qbar, each
term is an unbiased estimate of its closed-form counterpart, since
E[eta2] = sum p_k^2 and E[(r - 1) eta2] = sum p_k^2 (r_k - 1).

Ratio guard (a DECISION, METHOD.md section 7): r = 1 when V(n) = 0 in Eq. MC and
r_k = 1 when qbar = 0 in Eq. IB. Nothing has succeeded, so no step is better
or worse than another: the exploitation term is 0 and J = exploration.

Functions (all return Python floats):
    closed_form(p, q, beta)  -> J of Eq. IB
    terms(p, q, beta)        -> (exploration, exploitation) of Eq. IB; they sum to J
    monte_carlo(child_values, parent_value, step_probs, beta) -> J(n) of Eq. MC
    mc_terms(...)            -> (exploration, exploitation) of Eq. MC; they sum to J(n)
    cov_eta(...)             -> population Cov_c(eta1_c, eta2_c) over the children
                                (the paper's diagnostic); 0.0 when m < 2

Inputs are 1-D sequences of probabilities: lists, tuples, numpy arrays or torch
tensors. tree.py calls these per node, so the math is plain Python floats.
"""
from __future__ import annotations

import math

P_SUM_TOL = 1e-6


def _probs(name: str, x) -> list[float]:
    """x as a list of floats in [0, 1]; one pass, ValueError naming `name` otherwise."""
    seq = x.tolist() if hasattr(x, "tolist") else list(x)
    if not isinstance(seq, list):
        raise ValueError(f"{name} must be 1-D, got a scalar")
    if not seq:
        raise ValueError(f"{name} is empty")
    out = []
    for i, v in enumerate(seq):
        if isinstance(v, list):
            raise ValueError(f"{name} must be 1-D, got a nested sequence at {name}[{i}]")
        v = float(v)
        if not 0.0 <= v <= 1.0:  # also False for NaN
            what = "is NaN" if v != v else f"= {v!r} is outside [0, 1]"
            raise ValueError(f"{name}[{i}] {what}")
        out.append(v)
    return out


def _prob(name: str, v) -> float:
    v = float(v)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} {'is NaN' if v != v else f'= {v!r} is outside [0, 1]'}")
    return v


def _beta(beta) -> float:
    beta = float(beta)
    if not 0.0 < beta < math.inf:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return beta


def _pq(p, q, beta):
    p, q, beta = _probs("p", p), _probs("q", q), _beta(beta)
    if len(p) != len(q):
        raise ValueError(f"p and q differ in length ({len(p)} != {len(q)})")
    total = sum(p)
    if abs(total - 1.0) > P_SUM_TOL:
        raise ValueError(f"p must sum to 1 (within {P_SUM_TOL}), got sum {total!r}")
    qbar = sum(pk * qk for pk, qk in zip(p, q))
    # ratio guard: qbar = 0 means every q_k with p_k > 0 is 0, so r_k = 1
    r = [qk / qbar for qk in q] if qbar > 0.0 else [1.0] * len(q)
    return p, r, beta


def closed_form(p, q, beta) -> float:
    """J of Eq. IB: 1 + beta * sum_k p_k^2 (r_k - 1 - 1/beta), r_k = q_k / qbar."""
    p, r, beta = _pq(p, q, beta)
    c = 1.0 + 1.0 / beta
    return 1.0 + beta * sum(pk * pk * (rk - c) for pk, rk in zip(p, r))


def terms(p, q, beta) -> tuple[float, float]:
    """(exploration, exploitation) of Eq. IB: (1 - sum p^2, beta * (sum p^2 r - sum p^2))."""
    p, r, beta = _pq(p, q, beta)
    s2 = sum(pk * pk for pk in p)
    # Cov_p(p, r) = E_p[p r] - E_p[p] E_p[r] with E_p[r] = 1
    return 1.0 - s2, beta * sum(pk * pk * (rk - 1.0) for pk, rk in zip(p, r))


def _mc(child_values, parent_value, step_probs, beta):
    v = _probs("child_values", child_values)
    eta2 = _probs("step_probs", step_probs)
    vn, beta = _prob("parent_value", parent_value), _beta(beta)
    if len(v) != len(eta2):
        raise ValueError(f"child_values and step_probs differ in length ({len(v)} != {len(eta2)})")
    # ratio guard: V(n) = 0 means nothing below n has succeeded
    r = [vc / vn for vc in v] if vn > 0.0 else [1.0] * len(v)
    return r, eta2, beta


def monte_carlo(child_values, parent_value, step_probs, beta) -> float:
    """J(n) of Eq. MC: 1 + (beta/m) sum_c (r_c - 1 - 1/beta) * pi(c | prefix(n))."""
    r, eta2, beta = _mc(child_values, parent_value, step_probs, beta)
    c = 1.0 + 1.0 / beta
    return 1.0 + beta / len(r) * sum((rc - c) * e2 for rc, e2 in zip(r, eta2))


def mc_terms(child_values, parent_value, step_probs, beta) -> tuple[float, float]:
    """(exploration, exploitation) of Eq. MC: (1 - mean eta2, beta * mean (r - 1) eta2)."""
    r, eta2, beta = _mc(child_values, parent_value, step_probs, beta)
    m = len(r)
    return 1.0 - sum(eta2) / m, beta * sum((rc - 1.0) * e2 for rc, e2 in zip(r, eta2)) / m


def cov_eta(child_values, parent_value, step_probs, beta) -> float:
    """Population Cov_c(eta1_c, eta2_c) over the m children; 0.0 when m < 2."""
    r, eta2, beta = _mc(child_values, parent_value, step_probs, beta)
    m = len(r)
    if m < 2:
        return 0.0
    # eta1 = r - (1 + 1/beta) is a shift of r, so Cov(eta1, eta2) = Cov(r, eta2);
    # two-pass (centred) for accuracy
    mr, me = sum(r) / m, sum(eta2) / m
    return sum((rc - mr) * (e2 - me) for rc, e2 in zip(r, eta2)) / m
