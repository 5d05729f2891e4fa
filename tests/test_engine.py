"""engine.py: the continuous-batching decode loop against HF generate, and
tree.grow driven by it."""
import functools
import random

import pytest
import torch

import engine
import ibtpo
import tree
from tree import Sampling, TreeConfig

PREFIX_TEXTS = ["Compute 1+2.", "Hi", "Compute 12+30-4.", "Add 7 and 9, then halve.", "x", "Compute 3-1."]


def drain(dec):
    out = {}
    while dec.busy():
        for key, ids, lp in dec.step():
            assert key not in out
            out[key] = (ids, lp)
    return out


def test_greedy_matches_generate_whatever_the_pool(tiny_model, tiny_tokenizer):
    """Greedy: identical tokens to generate, with rows joining and leaving
    (pool of 2 for 6 requests of different lengths and budgets)."""
    tok, model = tiny_tokenizer, tiny_model
    prefixes = [tok(t)["input_ids"] for t in PREFIX_TEXTS]
    budgets = [24, 3, 17, 30, 1, 9]
    s = Sampling(temperature=0.0, max_response_tokens=30)
    ref = tree.generate_expander(model, tok, s, prefixes, budgets)
    for rows, prefill in ((1, 32768), (2, 32768), (4, 32768), (16, 32768), (16, 8)):  # 8: one prefix per prefill
        dec = engine.Decoder(model, tok, s, max_rows=rows, prefill_tokens=prefill)
        for i, (p, b) in enumerate(zip(prefixes, budgets)):
            dec.submit(i, p, b)
        got = drain(dec)
        assert [got[i][0] for i in range(len(prefixes))] == [ids for ids, _ in ref], rows
        for i, (ids, lp) in enumerate(ref):
            torch.testing.assert_close(torch.tensor(got[i][1]), torch.tensor(lp), atol=1e-4, rtol=0)
            assert len(ids) == budgets[i] or ids[-1] == tok.eos_token_id


def test_requests_beyond_one_prefill_join_in_the_same_step(tiny_model, tiny_tokenizer):
    """prefill_tokens bounds one forward, not one admission: with room for
    every request they all join at the first step, in several prefills."""
    tok, model = tiny_tokenizer, tiny_model
    prefixes = [tok(t)["input_ids"] for t in PREFIX_TEXTS]
    dec = engine.Decoder(model, tok, Sampling(temperature=0.0, max_response_tokens=30), max_rows=16,
                         prefill_tokens=8)
    prefills = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: prefills.append(kw["input_ids"].shape[0]) if kw["cache"] is not dec.cache else None,
        with_kwargs=True)
    try:
        for i, p in enumerate(prefixes):
            dec.submit(i, p, 5)
        dec.step()
    finally:
        hook.remove()
    assert sorted(r.key for r in dec.rows if r) == list(range(len(prefixes)))
    assert sum(prefills) == len(prefixes) and len(prefills) >= 3  # no prefill over 8 prefix tokens but a lone long one


def test_cache_outgrowing_its_spare_columns_changes_nothing(tiny_model, tiny_tokenizer, monkeypatch):
    """The pool's cache writes each step into spare columns and reallocates
    when they run out: with one spare column (a reallocation every step) and
    with none used up (the default), greedy tokens and log-probs are generate's."""
    tok, model = tiny_tokenizer, tiny_model
    prefixes = [tok(t)["input_ids"] for t in PREFIX_TEXTS]
    budgets = [24, 3, 17, 30, 1, 9]
    s = Sampling(temperature=0.0, max_response_tokens=30)
    ref = tree.generate_expander(model, tok, s, prefixes, budgets)
    for spare in (1, 2, 1000):
        monkeypatch.setattr(engine._Layer, "spare", spare)
        dec = engine.Decoder(model, tok, s, max_rows=3)
        for i, (p, b) in enumerate(zip(prefixes, budgets)):
            dec.submit(i, p, b)
        got = drain(dec)
        for i, (ids, lp) in enumerate(ref):
            assert got[i][0] == ids, spare
            torch.testing.assert_close(torch.tensor(got[i][1]), torch.tensor(lp), atol=1e-4, rtol=0)


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.8, 0), (1.0, 5), (0.9, 20)])
def test_one_sequence_samples_the_tokens_generate_samples(tiny_model, tiny_tokenizer, top_p, top_k):
    """Same seed, same single sequence: the same tokens as HF generate (the
    sampler follows generate's temperature -> top-k -> top-p -> multinomial)."""
    tok, model = tiny_tokenizer, tiny_model
    s = Sampling(temperature=0.9, top_p=top_p, top_k=top_k, max_response_tokens=40)
    p = tok("Compute 12+30-4.")["input_ids"]
    for seed in range(3):
        torch.manual_seed(seed)
        (ref_ids, ref_lp), = tree.generate_expander(model, tok, s, [p], [40])
        torch.manual_seed(seed)
        dec = engine.Decoder(model, tok, s, max_rows=4)
        dec.submit("q", p, 40)
        ids, lp = drain(dec)["q"]
        assert ids == ref_ids
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=0)


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.8, 0), (1.0, 5), (0.9, 20), (0.5, 3)])
def test_sample_draws_what_generate_draws_row_by_row(top_p, top_k):
    """engine.sample against transformers' own warpers (temperature -> top-k ->
    top-p) and torch.multinomial, same seed: the same token in every row, ties at
    the k-th score included, never an id past `vocab` (a padded embedding)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    vocab, V = 300, 320
    s = Sampling(temperature=0.7, top_p=top_p, top_k=top_k)
    warpers = [TemperatureLogitsWarper(0.7)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
        ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(256, V, generator=g) * 3
        if seed % 2:  # bf16-like logits: many exact ties, some at the k-th score
            logits = logits.round()
        ref = logits.clone()
        ref[:, vocab:] = -float("inf")
        for w in warpers:
            ref = w(None, ref)
        torch.manual_seed(seed)
        want = torch.multinomial(ref.softmax(-1), 1).squeeze(1)
        torch.manual_seed(seed)
        got, lp = engine.sample(logits.clone(), vocab, s)
        assert torch.equal(got, want), (seed, int((got != want).sum()))
        assert int(got.max()) < vocab
        torch.testing.assert_close(lp, torch.log_softmax(logits[:, :vocab] / 0.7, -1).gather(1, got[:, None])[:, 0])


def test_sampled_logprobs_match_a_forward_pass_and_stay_in_vocab(tiny_model, tiny_tokenizer):
    tok, model = tiny_tokenizer, tiny_model
    vocab = len(tok)
    torch.manual_seed(0)
    s = Sampling(temperature=0.7, top_p=1.0, top_k=0, max_response_tokens=20)
    prefixes = [tok(t)["input_ids"] for t in PREFIX_TEXTS]
    dec = engine.Decoder(model, tok, s, max_rows=3)
    for i, p in enumerate(prefixes):
        dec.submit(i, p, 20)
    got = drain(dec)
    for i, p in enumerate(prefixes):
        ids, lp = got[i]
        assert all(0 <= t < vocab for t in ids) and tok.eos_token_id not in ids[:-1]
        with torch.no_grad():
            logits = model(torch.tensor([p + ids])).logits[0, len(p) - 1:-1, :vocab] / 0.7
        ref = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-4, rtol=0)


def test_never_samples_past_vocab(tiny_model, tiny_tokenizer):
    tok, model = tiny_tokenizer, tiny_model
    vocab = len(tok)

    def boost_padding_rows(module, inputs, out):
        out = out.clone()
        out[..., vocab:] += 1e4
        return out
    model.lm_head.register_forward_hook(boost_padding_rows)
    dec = engine.Decoder(model, tok, Sampling(temperature=1.0, top_p=1.0, top_k=0), max_rows=2)
    for i in range(4):
        dec.submit(i, tok("abc")["input_ids"], 30)
    assert all(0 <= t < vocab for ids, _ in drain(dec).values() for t in ids)


def test_pool_never_exceeds_max_rows_and_trims_padding(tiny_model, tiny_tokenizer):
    """What every decode forward sees: at most max_rows rows; each unfinished
    row's real tokens = its prefix + the tokens fed so far; free slots (rows
    that finished) at most 1/8 of the rows; no column that is padding in every
    row; and at most one copy of the pool per step."""
    tok, model = tiny_tokenizer, tiny_model
    torch.manual_seed(0)
    dec = engine.Decoder(model, tok, Sampling(temperature=1.0, top_p=1.0, top_k=0), max_rows=3)
    prefixes = [tok("y" * n)["input_ids"] for n in (40, 2, 3, 25, 1, 7, 2)]
    budgets = [12, 3, 12, 5, 12, 1, 12]  # rows leave at different steps, one right after its prefill
    seen, forwards = 0, []

    def check(module, args, kwargs):
        mask = kwargs["attention_mask"]  # (B, T + 1): the column this step writes included
        if kwargs["cache"] is not dec.cache:  # a prefill, into a cache of its own
            return
        forwards.append(mask.shape[0])
        assert mask.shape[0] == len(dec.rows) <= 3
        assert mask.shape[1] == dec.cache.get_seq_length() + 1
        assert 8 * sum(r is None for r in dec.rows) <= len(dec.rows)
        assert bool(mask[:, 0].any())  # no column that is padding in every row
        assert [int(m.sum()) for m, r in zip(mask, dec.rows) if r] == \
            [len(prefixes[r.key]) + len(r.ids) for r in dec.rows if r]
    copies = []  # every _Layer.place, i.e. every copy of one layer of the pool
    place = engine._Layer.place
    hook = model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        engine._Layer.place = lambda layer, *a: copies.append(layer) or place(layer, *a)
        for i, (p, n) in enumerate(zip(prefixes, budgets)):
            dec.submit(i, p, n)
        while dec.busy():
            before = len(copies)
            out = dec.step()
            # a second copy only when a prefilled row ends at its first token
            assert len(copies) - before <= model.config.num_hidden_layers * (1 + any(len(ids) == 1 for _, ids, _ in out))
            for key, ids, _ in out:
                assert len(ids) == budgets[key] or ids[-1] == tok.eos_token_id
                seen += 1
    finally:
        engine._Layer.place = place
        hook.remove()
    assert seen == len(prefixes) and len(forwards) >= max(budgets)
    assert not dec.rows and dec.cache is None


def test_rows_join_free_slots_without_copying_the_pool(tiny_model, tiny_tokenizer):
    """Greedy, a pool of 8 and 16 requests: a row that finishes frees its slot
    and a newcomer no longer than the pool's width is written into it, with no
    copy of the pool; columns that are padding in every row leave the view at
    once; every request still gets generate's tokens."""
    tok, model = tiny_tokenizer, tiny_model
    prefixes = [tok("Compute " + "1+" * (20 - i) + "2.")["input_ids"] for i in range(8)] + \
        [tok(t)["input_ids"] for t in ("Hi", "x", "Compute 3-1.", "Add 7 and 9.", "Compute 1+2.", "y", "ab", "Go")]
    budgets = [6, 9, 12, 15, 18, 21, 24, 27] + [5, 9, 3, 7, 11, 4, 8, 6]
    s = Sampling(temperature=0.0, max_response_tokens=30)
    ref = tree.generate_expander(model, tok, s, prefixes, budgets)
    dec = engine.Decoder(model, tok, s, max_rows=8)
    log = []

    def check(module, args, kwargs):  # what each decode step attends to
        mask = kwargs["attention_mask"]
        if kwargs["cache"] is dec.cache:
            assert bool(mask[:, 0].any())  # columns that are padding in every row have left the view
            assert [int(m.sum()) for m, r in zip(mask, dec.rows) if r] == \
                [len(prefixes[r.key]) + len(r.ids) for r in dec.rows if r]
    hook = model.register_forward_pre_hook(check, with_kwargs=True)
    place, write = engine._Layer.place, engine._Layer.write
    try:
        engine._Layer.place = lambda layer, *a: log.append("place") or place(layer, *a)
        engine._Layer.write = lambda layer, *a: log.append("write") or write(layer, *a)
        for i, (p, b) in enumerate(zip(prefixes, budgets)):
            dec.submit(i, p, b)
        got, quiet_joins = {}, 0
        while dec.busy():
            before = len(log)
            for key, ids, lp in dec.step():
                got[key] = (ids, lp)
            quiet_joins += "write" in log[before:] and "place" not in log[before:]
    finally:
        engine._Layer.place, engine._Layer.write = place, write
        hook.remove()
    assert quiet_joins >= 4
    assert [got[i][0] for i in range(len(prefixes))] == [ids for ids, _ in ref]
    for i, (_, lp) in enumerate(ref):
        torch.testing.assert_close(torch.tensor(got[i][1]), torch.tensor(lp), atol=1e-4, rtol=0)


def test_a_longer_newcomer_widens_the_view_without_a_copy(tiny_model, tiny_tokenizer):
    """Columns that are padding in every row leave the cache's view when a long
    row finishes; a newcomer longer than the view then widens it back to the
    left, again with no copy of the pool, and still gets generate's tokens."""
    tok, model = tiny_tokenizer, tiny_model
    short = [tok(t)["input_ids"] for t in ("Hi", "x", "ab", "Go", "y", "Add", "Sum")]
    long_a, long_b = tok("Compute " + "1+" * 18 + "2.")["input_ids"], tok("Compute " + "3+" * 12 + "4.")["input_ids"]
    s = Sampling(temperature=0.0, max_response_tokens=30)
    ref = tree.generate_expander(model, tok, s, short + [long_a, long_b], [20] * 7 + [2, 6])
    dec = engine.Decoder(model, tok, s, max_rows=8)
    log = []
    place, window = engine._Layer.place, engine._Layer.window
    try:
        engine._Layer.place = lambda layer, *a: log.append("place") or place(layer, *a)
        engine._Layer.window = lambda layer, first, B: log.append(first) or window(layer, first, B)
        for i, p in enumerate(short):
            dec.submit(i, p, 20)
        dec.submit(7, long_a, 2)
        got, widened, wait = {}, False, None
        while dec.busy():
            if wait == 0:  # a step after long_a left (the view has dropped its columns): into its slot
                dec.submit(8, long_b, 6)
            wait = None if wait is None else wait - 1
            before = len(log)
            for key, ids, lp in dec.step():
                got[key] = (ids, lp)
                wait = 1 if key == 7 else wait
            if 8 in {r.key for r in dec.rows if r} and any(x < 0 for x in log[before:] if x != "place"):
                assert "place" not in log[before:]
                widened = True
    finally:
        engine._Layer.place, engine._Layer.window = place, window
    assert widened
    assert [got[i][0] for i in range(9)] == [ids for ids, _ in ref]
    for i, (_, lp) in enumerate(ref):
        torch.testing.assert_close(torch.tensor(got[i][1]), torch.tensor(lp), atol=1e-4, rtol=0)


def test_bad_arguments(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="max_rows"):
        engine.Decoder(tiny_model, tiny_tokenizer, Sampling(), max_rows=0)
    dec = engine.Decoder(tiny_model, tiny_tokenizer, Sampling())
    with pytest.raises(ValueError, match="max_new"):
        dec.submit(0, [1, 2], 0)


def _grow(model, tok, cfg, make_engine, seed, log=None):
    torch.manual_seed(seed)
    prompts = [tok(f"Compute {i}+{i + 1}.")["input_ids"] for i in range(3)]

    def reward_fn(texts, answers):
        if log is not None:
            log.append(len(texts))
        rewards = [float(sum(map(ord, t)) % 3 == 0) for t in texts]
        return rewards, {"correct": int(sum(rewards))}
    return tree.grow(prompts, ["1", "3", "5"], make_engine(), reward_fn, tok, cfg, 40, random.Random(seed))


def test_grow_with_the_decoder_builds_the_same_trees_greedily(tiny_model, tiny_tokenizer):
    """Greedy decoding: Lockstep and Decoder must build identical trees, though
    the Decoder lets questions run their rounds at different times."""
    tok, model = tiny_tokenizer, tiny_model
    s = Sampling(temperature=0.0, max_response_tokens=40)
    cfg = TreeConfig(B0=2, L=4, K=1, B=2, strategy="random", max_step_tokens=5)
    a, _ = _grow(model, tok, cfg, lambda: engine.Lockstep(functools.partial(tree.generate_expander, model, tok, s)), 0)

    def shape(t):
        return [(n.ids, n.terminal, n.reward) for n in t.nodes()]
    for reuse in (True, False):  # branches copy their prefix's cache from an earlier request, or prefill it
        log, made = [], []
        b, counts = _grow(model, tok, cfg, lambda: made.append(engine.Decoder(
            model, tok, s, max_rows=3, reuse_prefix_kv=reuse)) or made[-1], 0, log)
        assert [shape(t) for t in a] == [shape(t) for t in b], reuse
        assert sum(log) == 3 * cfg.G and counts["correct"] == sum(n.reward for t in b for n in t.leaves())
        assert (made[0].reused_tokens > 0) == reuse
        assert not made[0].kept  # every finished tree released its requests' caches


def test_grow_releases_each_tree_when_it_is_complete(tiny_model, tiny_tokenizer):
    """Kept caches live only while their tree grows: one release per question,
    naming that question's G requests, then grow's final clean-up."""
    tok, model = tiny_tokenizer, tiny_model
    calls = []

    class Recording(engine.Decoder):
        def release(self, keys):
            calls.append(list(keys))
            super().release(keys)
    cfg = TreeConfig(B0=2, L=3, K=1, B=1, strategy="ib", max_step_tokens=5)
    dec = Recording(model, tok, Sampling(temperature=1.0, top_p=1.0, top_k=0), max_rows=4)
    trees, _ = _grow(model, tok, cfg, lambda: dec, 0)
    assert len(calls) == len(trees) + 1 and not dec.kept and dec.reused_tokens > 0
    for keys in calls[:-1]:
        assert len(keys) == cfg.G and len({i for i, _, _ in keys}) == 1
    assert {k for keys in calls[:-1] for k in keys} == set(calls[-1])


def test_reused_prefix_cache_gives_the_tokens_a_prefill_gives(tiny_model, tiny_tokenizer):
    """A request reusing a kept request's cache (and one reusing that one's,
    whose prefix reaches back into the first) decodes greedily exactly what the
    same request decodes after a fresh prefill; a wrong `reuse` is an error."""
    tok, model = tiny_tokenizer, tiny_model
    s = Sampling(temperature=0.0, max_response_tokens=30)
    p = tok("Compute 12+30-4.")["input_ids"]

    def run(dec, key, prefix, reuse=None):
        dec.submit(key, prefix, 12, reuse=reuse, keep=True)
        return drain(dec)[key][0]
    dec = engine.Decoder(model, tok, s, max_rows=4)
    a = run(dec, "a", p)
    b_prefix = p + a[:5]
    b = run(dec, "b", b_prefix, reuse="a")
    c_prefix = b_prefix + b[:3]  # its first len(p) + 5 tokens come from "a", the next 3 from "b"
    c = run(dec, "c", c_prefix, reuse="b")
    d_prefix = p + a[:2]         # shorter than what "b" copied from "a": "b" hands it on to "a"
    d = run(dec, "d", d_prefix, reuse="b")
    assert dec.reused_tokens == len(b_prefix) + len(c_prefix) + len(d_prefix) - 3
    plain = engine.Decoder(model, tok, s, max_rows=4, reuse_prefix_kv=False)
    for prefix, got in ((b_prefix, b), (c_prefix, c), (d_prefix, d)):
        assert run(plain, "x", prefix) == got
    assert plain.reused_tokens == 0 and not plain.kept
    with pytest.raises(ValueError, match="reuse='a'"):
        run(dec, "e", tok("Something else entirely")["input_ids"], reuse="a")
    dec.release(["a", "b", "c", "d"])
    assert not dec.kept


def test_grow_with_the_decoder_samples_G_leaves_per_question(tiny_model, tiny_tokenizer):
    tok, model = tiny_tokenizer, tiny_model
    s = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_response_tokens=40)
    cfg = TreeConfig(B0=2, L=4, K=1, B=2, strategy="ib", max_step_tokens=5)
    trees, _ = _grow(model, tok, cfg, lambda: engine.Decoder(model, tok, s, max_rows=4), 1)
    for t in trees:
        assert len(t.leaves()) == cfg.G
        assert all(leaf.reward in (0.0, 1.0) for leaf in t.leaves())
        for traj in ibtpo.trajectories(t):
            assert len(traj.response_ids) <= 40
    again, _ = _grow(model, tok, cfg, lambda: engine.Decoder(model, tok, s, max_rows=4), 1)
    assert [[n.ids for n in t.nodes()] for t in trees] == [[n.ids for n in t.nodes()] for t in again]
