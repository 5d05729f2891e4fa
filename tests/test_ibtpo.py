"""ibtpo.py: advantages (Eq. GL/LOCAL/ADV), token log-probs, and Eq. LOSS."""
import math

import pytest
import torch

import ibtpo
from ibtpo import (compute_advantages, loss_normalizer, policy_loss, token_advantages, token_logprobs,
                   trajectories)
from tree import Tree

L = math.log


# --------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------

def hand_tree():
    """root -> a -> {a1 (R=1), a2 (R=0)};  root -> b (R=1).

    V: a1 = 1, a2 = 0, a = 1/2, b = 1, root = 2/3.
    """
    t = Tree(prompt_ids=[5, 6], answer="1")
    a = t.root.add_child([10, 11], [L(0.5), L(0.5)])           # pi_old mean = .5
    a1 = a.add_child([12], [L(0.8)], terminal=True)             # pi_old = .8
    a2 = a.add_child([13], [L(0.2)], terminal=True)             # pi_old = .2
    b = t.root.add_child([14, 15], [L(0.5), L(0.5)], terminal=True)  # mean .5, joint .25
    a1.reward, a2.reward, b.reward = 1.0, 0.0, 1.0
    t.update_values()
    return t, a, a1, a2, b


def test_advantages_hand_tree():
    t, a, a1, a2, b = hand_tree()
    compute_advantages(t, beta=5.0, lam=0.1)
    # population std of [1, 0, 1] = sqrt(2/9) = sqrt(2)/3; 1 + 1/beta = 1.2
    # A_GL: a = (1/2 - 2/3)/(sqrt2/3) = -1/(2 sqrt2); b, a1 = (1/3)/(sqrt2/3) = 1/sqrt2;
    #       a2 = (-2/3)/(sqrt2/3) = -sqrt2
    r2 = math.sqrt(2)
    assert a.A_GL == pytest.approx(-1 / (2 * r2))
    assert b.A_GL == pytest.approx(1 / r2)
    assert a1.A_GL == pytest.approx(1 / r2)
    assert a2.A_GL == pytest.approx(-r2)
    # A_IB: a = (0.5/(2/3) - 1.2) * .5 = -0.225;  b = (1/(2/3) - 1.2) * .5 = 0.15
    #       a1 = (1/0.5 - 1.2) * .8 = 0.64;       a2 = (0 - 1.2) * .2 = -0.24
    assert a.A_IB == pytest.approx(-0.225)
    assert b.A_IB == pytest.approx(0.15)
    assert a1.A_IB == pytest.approx(0.64)
    assert a2.A_IB == pytest.approx(-0.24)
    # A = A_GL + 0.1 * A_IB
    assert a.A == pytest.approx(-1 / (2 * r2) - 0.0225)
    assert b.A == pytest.approx(1 / r2 + 0.015)
    assert a1.A == pytest.approx(1 / r2 + 0.064)
    assert a2.A == pytest.approx(-r2 - 0.024)
    assert t.root.A == 0.0


def test_advantages_joint_step_prob_and_token_mapping():
    t, a, a1, a2, b = hand_tree()
    compute_advantages(t, beta=5.0, lam=0.1, step_prob_mode="joint")
    assert b.A_IB == pytest.approx(0.3 * 0.25)              # pi_old = .5 * .5
    trajs = {tuple(tr.response_ids): tr for tr in trajectories(t)}
    assert token_advantages(trajs[(10, 11, 12)]) == [a.A, a.A, a1.A]
    assert token_advantages(trajs[(14, 15)]) == [b.A, b.A]


def test_sqrt_leaves_option():
    t, a, a1, a2, b = hand_tree()
    compute_advantages(t, beta=5.0, lam=0.1)
    plain = {n: n.A for n in t.nodes()[1:]}
    compute_advantages(t, beta=5.0, lam=0.1, sqrt_leaves=True)
    assert a.A == pytest.approx(plain[a] / math.sqrt(2))    # two leaves below a
    for n in (a1, a2, b):
        assert n.A == pytest.approx(plain[n])


def test_beta_must_be_positive_and_rewards_set():
    t, *_ = hand_tree()
    with pytest.raises(ValueError):
        compute_advantages(t, beta=0.0, lam=0.1)
    t.leaves()[0].reward = None
    with pytest.raises(ValueError):
        compute_advantages(t, beta=5.0, lam=0.1)


def independent_tree(rewards, lengths, steps_per_chain=1):
    t = Tree(prompt_ids=[1], answer="x")
    g = torch.Generator().manual_seed(0)
    for R, n in zip(rewards, lengths):
        node = t.root
        for k in range(steps_per_chain):
            lp = (-torch.rand(n, generator=g)).tolist()
            node = node.add_child(list(range(2, 2 + n)), lp, terminal=k == steps_per_chain - 1)
        node.reward = float(R)
    return t


@pytest.mark.parametrize("steps_per_chain", [1, 3])
def test_grpo_equivalence(steps_per_chain):
    rewards = [1, 0, 0, 1, 1, 0, 0, 0]
    lengths = [3, 1, 5, 2, 4, 7, 1, 2]
    t = independent_tree(rewards, lengths, steps_per_chain)
    compute_advantages(t, beta=5.0, lam=0.0)
    R = torch.tensor(rewards, dtype=torch.float64)
    grpo = ((R - R.mean()) / R.std(unbiased=False)).tolist()
    trajs = trajectories(t)
    assert len(trajs) == len(rewards)
    for i, tr in enumerate(trajs):                            # leaves in insertion order
        assert tr.reward == rewards[i]
        adv = token_advantages(tr)
        assert len(adv) == lengths[i] * steps_per_chain
        assert adv == pytest.approx([grpo[i]] * len(adv), abs=1e-12)


def test_std_zero_gives_zero_global_advantage():
    for R in (0.0, 1.0):
        t = independent_tree([R] * 4, [2, 3, 1, 2], steps_per_chain=2)
        compute_advantages(t, beta=5.0, lam=0.1)
        for n in t.nodes()[1:]:
            assert n.A_GL == 0.0
            # r = 1 everywhere (guard or equal V): A_IB = (1 - 1.2) * pi_old
            assert n.A_IB == pytest.approx(-0.2 * ibtpo.step_prob(n))
            assert n.A == pytest.approx(0.1 * n.A_IB)
    # non-binary equal rewards: the mean may round, the rule must still hold
    t = independent_tree([0.1] * 3, [1, 1, 1])
    compute_advantages(t, beta=5.0, lam=0.0)
    assert all(n.A == 0.0 for n in t.nodes()[1:])


def test_ratio_guard_parent_value_zero():
    """root -> a -> {a1 (R=0), a2 (R=0)};  root -> b (R=1).  V(a) = 0."""
    t = Tree(prompt_ids=[1], answer="x")
    a = t.root.add_child([3], [L(0.5)])
    a1 = a.add_child([4], [L(0.4)], terminal=True)
    a2 = a.add_child([5], [L(1.0)], terminal=True)
    b = t.root.add_child([6], [L(0.5)], terminal=True)
    a1.reward, a2.reward, b.reward = 0.0, 0.0, 1.0
    compute_advantages(t, beta=2.0, lam=1.0)                 # 1 + 1/beta = 1.5
    assert a1.A_IB == pytest.approx((1 - 1.5) * 0.4)         # guard: r = 1
    assert a2.A_IB == pytest.approx((1 - 1.5) * 1.0)
    assert a.A_IB == pytest.approx((0 / (1 / 3) - 1.5) * 0.5)
    assert b.A_IB == pytest.approx((1 / (1 / 3) - 1.5) * 0.5)
    assert all(math.isfinite(n.A) for n in t.nodes())


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------

def two_token_case():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[L(1.1), L(0.7)]], requires_grad=True)   # w = 1.1, 0.7
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    return logp, old, adv, mask


def test_loss_and_gradient_by_hand():
    logp, old, adv, mask = two_token_case()
    loss, st = policy_loss(logp, old, adv, mask, normalizer=2.0)
    # token 1: w = 1.1 inside the band, l = -1.1
    # token 2: A < 0, w = 0.7 < 0.8: min(-0.7, -0.8) = -0.8 (clipped), l = 0.8
    assert loss.item() == pytest.approx((-1.1 + 0.8) / 2)
    loss.backward()
    # d l / d logp = -w A on unclipped tokens, 0 on clipped ones
    assert logp.grad[0].tolist() == pytest.approx([-1.1 / 2, 0.0])
    assert st["tokens"].item() == 2 and st["clipped"].item() == 1
    assert st["clipped_low"].item() == 1 and st["clipped_high"].item() == 0
    assert st["ratio"].item() == pytest.approx(1.8)


def test_loss_with_kl_by_hand():
    logp, old, adv, mask = two_token_case()
    ref = torch.tensor([[0.0, 0.0]])
    c = 0.5
    loss, st = policy_loss(logp, old, adv, mask, 2.0, ref_logp=ref, kl_coef=c)
    # d = ref - logp = -log w;  k3 = exp(d) - d - 1 = 1/w + log w - 1
    k3 = [1 / w + L(w) - 1 for w in (1.1, 0.7)]
    assert all(k > 0 for k in k3)
    assert loss.item() == pytest.approx((-1.1 + 0.8 + c * sum(k3)) / 2)
    assert st["kl"].item() == pytest.approx(sum(k3))
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - 1/w
    g = [(-1.1 + c * (1 - 1 / 1.1)) / 2, (0.0 + c * (1 - 1 / 0.7)) / 2]
    assert logp.grad[0].tolist() == pytest.approx(g)


def test_kl_zero_when_policy_is_reference():
    logp = torch.tensor([[-0.3, -1.2, -2.0]], requires_grad=True)
    old = logp.detach().clone()
    adv = torch.zeros(1, 3)
    loss, st = policy_loss(logp, old, adv, torch.ones(1, 3), 3.0, ref_logp=old.clone(), kl_coef=0.1)
    loss.backward()
    assert st["kl"].item() == 0.0 and loss.item() == 0.0
    assert torch.all(logp.grad == 0)


def test_kl_needs_reference():
    logp, old, adv, mask = two_token_case()
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, 2.0, kl_coef=0.1)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, 2.0, agg="sum")


def grad_at(w, A, eps_low=0.2, eps_high=0.2):
    logp = torch.tensor([[math.log(w)]], requires_grad=True)
    loss, st = policy_loss(logp, torch.zeros(1, 1), torch.tensor([[A]]), torch.ones(1, 1), 1.0,
                           eps_low=eps_low, eps_high=eps_high)
    loss.backward()
    return logp.grad.item(), st["clipped"].item()


def test_clip_boundaries():
    # A > 0: above 1 + eps_high clipped (no gradient), inside and below not
    assert grad_at(1.25, 1.0) == (0.0, 1.0)
    assert grad_at(1.15, 1.0)[0] == pytest.approx(-1.15)
    assert grad_at(0.5, 1.0)[0] == pytest.approx(-0.5)        # A>0 never clipped from below
    # A < 0: below 1 - eps_low clipped, inside and above not
    assert grad_at(0.75, -1.0) == (0.0, 1.0)
    assert grad_at(0.85, -1.0)[0] == pytest.approx(0.85)
    assert grad_at(1.5, -1.0)[0] == pytest.approx(1.5)        # A<0 never clipped from above
    # asymmetric band (clip-higher): eps_low = 0.2, eps_high = 0.28
    assert grad_at(1.25, 1.0, 0.2, 0.28)[0] == pytest.approx(-1.25)
    assert grad_at(1.30, 1.0, 0.2, 0.28) == (0.0, 1.0)
    assert grad_at(0.75, -1.0, 0.2, 0.28) == (0.0, 1.0)
    assert grad_at(0.75, -1.0, 0.3, 0.28)[0] == pytest.approx(0.75)


def agg_batch():
    """w = 1 everywhere, so l_t = -A_t. Row 0: 3 tokens A = 1, 2, 3; row 1: 1 token A = 6."""
    adv = torch.tensor([[1.0, 2.0, 3.0], [6.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp = torch.zeros(2, 3)
    return logp, logp.clone(), adv, mask


@pytest.mark.parametrize("agg,max_tokens,norm,expected", [
    ("token-mean", None, 4.0, -(1 + 2 + 3 + 6) / 4),             # -3
    ("seq-mean-token-mean", None, 2.0, -((1 + 2 + 3) / 3 + 6) / 2),  # -4
    ("constant", 4, 8.0, -(1 + 2 + 3 + 6) / (2 * 4)),             # -1.5
])
def test_aggregation_modes_by_hand(agg, max_tokens, norm, expected):
    logp, old, adv, mask = agg_batch()
    assert loss_normalizer([mask], agg, max_tokens) == norm
    loss, _ = policy_loss(logp, old, adv, mask, norm, agg=agg)
    assert loss.item() == pytest.approx(expected)


def split_batch():
    g = torch.Generator().manual_seed(1)
    B, T = 4, 7
    lengths = [7, 2, 5, 3]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    old = -torch.rand(B, T, generator=g) * 2
    logp0 = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    logp0[mask == 0] = 1e4     # garbage at padding (exp overflows) must not leak into loss or grads
    return logp0, old, adv, mask, ref


def micro_loss(logp, old, adv, mask, ref, rows, norm, agg, world_size=1):
    rows = torch.tensor(rows)
    T = int(mask[rows].sum(-1).max())    # each micro-batch padded to its own length
    sl = lambda x: x[rows, :T]
    return policy_loss(sl(logp), sl(old), sl(adv), sl(mask), norm, ref_logp=sl(ref), kl_coef=0.05,
                       agg=agg, eps_low=0.2, eps_high=0.28, world_size=world_size)[0]


@pytest.mark.parametrize("agg", ibtpo.AGG_MODES)
def test_split_invariance(agg):
    logp0, old, adv, mask, ref = split_batch()
    mt = 8 if agg == "constant" else None
    norm = loss_normalizer([mask], agg, mt)

    def local_norm(splits):
        return loss_normalizer([mask[torch.tensor(r)] for r in splits], agg, mt)

    def run(splits, world_size=1):
        logp = logp0.clone().requires_grad_(True)
        total = sum(micro_loss(logp, old, adv, mask, ref, r, norm, agg, world_size) for r in splits)
        total.backward()
        return total.detach(), logp.grad

    full, g_full = run([[0, 1, 2, 3]])
    assert torch.isfinite(g_full).all() and torch.all(g_full[mask == 0] == 0)
    for splits in ([[0, 1], [2, 3]], [[0], [1, 2, 3]], [[3], [0, 2], [1]]):
        assert local_norm(splits) == norm
        loss, g = run(splits)
        assert torch.allclose(loss, full, atol=1e-6)
        assert torch.allclose(g, g_full, atol=1e-7)

    # two data-parallel ranks, each multiplying by world_size; DDP averages
    ranks = ([[0, 1]], [[2], [3]])
    assert sum(local_norm(r) for r in ranks) == norm        # the all-reduce SUM
    losses, grads = zip(*(run(r, world_size=2) for r in ranks))
    assert torch.allclose(sum(losses) / 2, full, atol=1e-6)
    assert torch.allclose(sum(grads) / 2, g_full, atol=1e-7)


def test_normalizer_ignores_empty_rows_and_needs_constant():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert loss_normalizer([mask], "token-mean") == 2
    assert loss_normalizer([mask], "seq-mean-token-mean") == 1
    assert loss_normalizer([mask, mask], "constant", max_tokens=10) == 20
    with pytest.raises(ValueError):
        loss_normalizer([mask], "constant")


# --------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------

def direct(model, ids, am, temperature):
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float() / temperature
    lsm = torch.log_softmax(logits[:, :-1], -1)
    logp = lsm.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent


def test_token_logprobs_matches_direct_and_chunking(tiny_model, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer("7+5=12\n\nso 12")["input_ids"],
                        tiny_tokenizer("x - 3 = -5, x=-2")["input_ids"][:13]])
    am = torch.ones_like(ids)
    with torch.no_grad():
        ref_lp, ref_ent = direct(tiny_model, ids, am, 0.7)
        for chunk in (1, 5, 1024):
            lp, ent = token_logprobs(tiny_model, ids, am, temperature=0.7, chunk_rows=chunk)
            assert lp.shape == ent.shape == (2, ids.shape[1] - 1)
            assert lp.dtype == ent.dtype == torch.float32
            torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
            torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    assert torch.all(ref_ent > 0) and torch.all(ref_lp < 0)


def test_token_logprobs_left_padding(tiny_model, tiny_tokenizer):
    rows = [tiny_tokenizer(s)["input_ids"] for s in ("What is 7 + 5?", "half of 1", "x")]
    T = max(map(len, rows))
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        lp, ent = token_logprobs(tiny_model, ids, am, chunk_rows=7)
        for i, r in enumerate(rows):
            one = torch.tensor([r])
            lp1, ent1 = token_logprobs(tiny_model, one, torch.ones_like(one))
            k = len(r) - 1
            if k:
                torch.testing.assert_close(lp[i, -k:], lp1[0], atol=1e-5, rtol=0)
                torch.testing.assert_close(ent[i, -k:], ent1[0], atol=1e-5, rtol=0)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


def test_token_logprobs_gradients_through_chunks(tiny_model, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer("12\n\n34")["input_ids"]])
    am = torch.ones_like(ids)
    params = [p for p in tiny_model.parameters()]

    def grads(fn):
        tiny_model.zero_grad()
        lp, ent = fn()
        (lp.sum() + 0.1 * ent.sum()).backward()
        return [p.grad.clone() for p in params]

    g_ref = grads(lambda: direct(tiny_model, ids, am, 1.0))
    g_chunk = grads(lambda: token_logprobs(tiny_model, ids, am, chunk_rows=2))
    for a, b in zip(g_ref, g_chunk):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_token_logprobs_passes_position_ids_from_mask(tiny_model):
    """Llama 5.x would use arange(T) for every row; left-padded rows must start at 0."""
    seen = {}
    orig = tiny_model.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return orig(*args, **kwargs)
    tiny_model.forward = spy
    ids = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        token_logprobs(tiny_model, ids, am)
    assert seen["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_token_logprobs_drop_the_padded_vocabulary(tiny_model, tiny_tokenizer):
    """With vocab_size, log-probs normalise over the tokenizer's ids only, as the
    rollout's do (tree.generate_expander never samples the padded rows)."""
    ids = torch.tensor([tiny_tokenizer("Compute 1+2.")["input_ids"]])
    attn = torch.ones_like(ids)
    V = len(tiny_tokenizer)
    logp, ent = ibtpo.token_logprobs(tiny_model, ids, attn, temperature=0.7, chunk_rows=3, vocab_size=V)
    with torch.no_grad():
        ref = torch.log_softmax(tiny_model(ids).logits[0, :-1, :V] / 0.7, -1)
    torch.testing.assert_close(logp[0], ref.gather(1, ids[0, 1:, None]).squeeze(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[0], -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=0)
    full, _ = ibtpo.token_logprobs(tiny_model, ids, attn, temperature=0.7)
    assert (full < logp).all()  # the padded rows took some probability mass
