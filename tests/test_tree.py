"""tree.py: step splitting, the batched expander, strategies, bookkeeping."""
import functools
import math
import random

import pytest
import torch

import engine
import ib_score
import ibtpo
import tree
from tree import Sampling, Tree, TreeConfig

CAP = 48


def fake_reward(texts, answers):
    """A deterministic stand-in verifier for the random-init model: R depends on the text."""
    rewards = [float(sum(map(ord, t)) % 3 == 0) for t in texts]
    return rewards, {"correct": int(sum(rewards)), "wrong": len(rewards) - int(sum(rewards))}


def recording(expand, log):
    def wrapped(prefixes, max_new):
        outs = expand(prefixes, max_new)
        log.append((prefixes, max_new, outs))
        return outs
    return wrapped


def grow_tiny(model, tok, cfg, seed=0, n_questions=3, sampling=None, log=None):
    torch.manual_seed(seed)
    sampling = sampling or Sampling(temperature=1.0, top_p=1.0, top_k=0, max_response_tokens=CAP)
    expand = functools.partial(tree.generate_expander, model, tok, sampling)
    if log is not None:
        expand = recording(expand, log)
    prompts = [tok(f"Compute {i}+{i + 1}.")["input_ids"] for i in range(n_questions)]
    return tree.grow(prompts, [str(2 * i + 1) for i in range(n_questions)], engine.Lockstep(expand), fake_reward,
                     tok, cfg, sampling.max_response_tokens, random.Random(seed))


# ---------------------------------------------------------------- step splitting

def _texts(tok, steps):
    return [tok.decode(s) for s in steps]


def test_split_steps_char_level(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("Add 1.\n\nGet 2.\n\n\n\n\\boxed{2}")["input_ids"]
    steps = tree.split_steps(ids, tok)
    assert _texts(tok, steps) == ["Add 1.\n\n", "Get 2.\n\n", "\n\n", "\\boxed{2}"]
    assert sum(steps, []) == ids
    # "\n\n" is spread over two tokens here: the cut comes after the second one
    assert tok.decode(steps[0][-2:]) == "\n\n" and len(steps[0][-1:]) == 1
    assert tree.split_steps([], tok) == []
    assert _texts(tok, tree.split_steps(tok("a\nb\n")["input_ids"], tok)) == ["a\nb\n"]


def test_split_steps_length_cap(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("abcdefg\n\nxy")["input_ids"]
    assert _texts(tok, tree.split_steps(ids, tok, max_step_tokens=4)) == ["abcd", "efg\n", "\n", "xy"]


def test_split_steps_real_bpe(smollm_tokenizer):
    tok = smollm_tokenizer
    text = "First, 3+4=7.\n\nThen 7*2=14.\n\n\\boxed{14}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    steps = tree.split_steps(ids, tok)
    assert sum(steps, []) == ids
    assert [tok.decode(s) for s in steps] == ["First, 3+4=7.\n\n", "Then 7*2=14.\n\n", "\\boxed{14}"]
    # SmolLM2 merges "\n\n" with the following spaces (":\n\n " is one token):
    # the cut falls at the first token boundary after the match, so the step
    # keeps that whole token and the next one starts with " b".
    ids = tok("ok:\n\n  b", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[2]) == "\n\n "
    assert [tok.decode(s) for s in tree.split_steps(ids, tok)] == ["ok:\n\n ", " b"]


# ---------------------------------------------------------------- the expander

def test_expander_logprobs_match_forward_pass(tiny_model, tiny_tokenizer):
    """The rollout log-probs are those of the temperature-scaled distribution over
    the tokenizer's vocabulary (the padded rows of the embedding are excluded)."""
    tok, model = tiny_tokenizer, tiny_model
    torch.manual_seed(1)
    prefixes = [tok("Compute 1+2.")["input_ids"], tok("Hi")["input_ids"], tok("Compute 12+30-4.")["input_ids"]]
    s = Sampling(temperature=0.7, top_p=1.0, top_k=0, max_response_tokens=20)
    outs = tree.generate_expander(model, tok, s, prefixes, [20, 5, 12])
    for p, (ids, lp), cap in zip(prefixes, outs, [20, 5, 12]):
        assert 0 < len(ids) <= cap and len(lp) == len(ids)
        assert tok.eos_token_id not in ids[:-1]
        with torch.no_grad():
            logits = model(torch.tensor([p + ids])).logits[0, len(p) - 1:-1, :len(tok)] / 0.7
        ref = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-4, rtol=0)


def test_expander_greedy_ignores_padding(tiny_model, tiny_tokenizer):
    """Left padding must not change what a row generates (greedy, float32)."""
    tok, model = tiny_tokenizer, tiny_model
    prefixes = [tok("Compute 1+2.")["input_ids"], tok("Hi")["input_ids"]]
    s = Sampling(temperature=0.0, max_response_tokens=16)
    together = tree.generate_expander(model, tok, s, prefixes, [16, 16])
    alone = [tree.generate_expander(model, tok, s, [p], [16])[0] for p in prefixes]
    assert [ids for ids, _ in together] == [ids for ids, _ in alone]


def test_expander_never_samples_past_vocab(tiny_model, tiny_tokenizer):
    tok, model = tiny_tokenizer, tiny_model
    vocab = len(tok)
    assert model.config.vocab_size > vocab

    def boost_padding_rows(module, inputs, out):  # make the unused rows overwhelmingly likely
        out = out.clone()
        out[..., vocab:] += 1e4
        return out
    model.lm_head.register_forward_hook(boost_padding_rows)
    torch.manual_seed(0)
    outs = tree.generate_expander(model, tok, Sampling(temperature=1.0, top_p=1.0, top_k=0),
                                  [tok("abc")["input_ids"]] * 4, [30] * 4)
    assert all(0 <= i < vocab for ids, _ in outs for i in ids)
    assert all(len(ids) == 30 or ids[-1] == tok.eos_token_id for ids, _ in outs)


@pytest.fixture
def preset_dir(tiny_dir, tmp_path):
    """The tiny model saved with a generation_config.json that sets everything a
    checkpoint can ship that changes sampling: a repetition penalty (Qwen2.5-Instruct
    ships 1.05), no-repeat n-grams, minimum lengths, bad words, suppressed tokens,
    forced first and last tokens, and its own temperature / top-k /
    top-p / max length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    a, b, c = tok.convert_tokens_to_ids(["a", "b", "c"])
    model.generation_config = GenerationConfig(
        repetition_penalty=1.3, no_repeat_ngram_size=2, min_length=30, min_new_tokens=12,
        bad_words_ids=[[a]], suppress_tokens=[b], begin_suppress_tokens=[tok.eos_token_id],
        forced_bos_token_id=a, forced_eos_token_id=c,
        do_sample=True, temperature=0.3, top_k=3, top_p=0.5, max_new_tokens=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert "repetition_penalty" in (tmp_path / "generation_config.json").read_text()
    return str(tmp_path)


@pytest.mark.parametrize("sampling", [Sampling(temperature=0.0), Sampling(1.0, 1.0, 0), Sampling(0.7, 0.9, 20)],
                         ids=["greedy", "pure", "top-k-p"])
def test_expander_samples_what_is_configured_whatever_the_checkpoint_ships(tiny_dir, preset_dir, sampling):
    """Same weights, with and without the checkpoint's generation_config.json: the same
    tokens and log-probs for the same seed, and the Decoder (which never reads the
    file) agrees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prefixes = [tok("Compute 1+2.")["input_ids"], tok("ab")["input_ids"], tok("Hi there")["input_ids"]]
    outs = []
    for path in (tiny_dir, preset_dir):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.manual_seed(3)
        outs.append(tree.generate_expander(model, tok, sampling, prefixes, [24, 24, 24]))
    assert outs[0] == outs[1]
    assert max(len(ids) for ids, _ in outs[1]) > 2  # not the file's max_new_tokens
    if sampling.temperature == 0:
        dec = engine.Decoder(model, tok, sampling, max_rows=4)
        for i, p in enumerate(prefixes):
            dec.submit(i, p, 24)
        done = {}
        while dec.busy():
            done.update({k: ids for k, ids, _ in dec.step()})
        assert [done[i] for i in range(3)] == [ids for ids, _ in outs[1]]
    assert model.generation_config.repetition_penalty == 1.3  # the checkpoint's own file is left as it was


def test_a_5000_step_response_builds_a_tree_and_its_advantages():
    """A base model emitting blank lines makes one step per token: nothing may
    recurse once per step (Python's limit is 1,000)."""
    class OneLongResponse:  # an engine: every request gets 5,000 one-token steps, then EOS
        def __init__(self):
            self.queue = []

        def submit(self, key, prefix, max_new, priority=0, reuse=None, keep=False):
            self.queue.append((key, min(max_new, 5000)))

        def busy(self):
            return bool(self.queue)

        def step(self):
            out = [(key, [5] * (n - 1) + [1], [-0.1] * n) for key, n in self.queue]
            self.queue = []
            return out

        def release(self, keys):
            pass

    class Tok:  # one character per id; id 1 is EOS
        eos_token_id = 1

        def decode(self, ids, skip_special_tokens=True):
            return "".join("" if i == 1 else "x" for i in ids)

        def batch_decode(self, seqs, skip_special_tokens=True):
            return [self.decode(s) for s in seqs]

    cfg = TreeConfig(B0=2, L=2, K=1, B=1, strategy="ib", max_step_tokens=1)
    trees, _ = tree.grow([[7, 8]], ["1"], OneLongResponse(), lambda t, a: ([1.0, 0.0, 1.0][:len(t)], {}),
                         Tok(), cfg, 6000, random.Random(0))
    t = trees[0]
    depths = sorted(leaf.depth for leaf in t.leaves())
    assert len(depths) == 3 and depths[:2] == [5000, 5000] and depths[2] > 5000  # a branch mid-chain
    ibtpo.compute_advantages(t, beta=5.0, lam=0.1, sqrt_leaves=True)
    trajs = ibtpo.trajectories(t)
    assert sorted(len(tr.response_ids) for tr in trajs) == depths
    assert all(len(ibtpo.token_advantages(tr)) == len(tr.response_ids) for tr in trajs)
    assert tree.tree_stats(trees, cfg)["trajectories"] == 3
    assert t.root.V == pytest.approx(2 / 3)


# ---------------------------------------------------------------- trees

@pytest.mark.parametrize("strategy", sorted(tree.STRATEGIES))
def test_grow_gives_G_leaves_and_exact_prefixes(tiny_model, tiny_tokenizer, strategy):
    cfg = TreeConfig(B0=2, L=4, K=1, B=2, strategy=strategy, max_step_tokens=6)
    log = []
    trees, counts = grow_tiny(tiny_model, tiny_tokenizer, cfg, log=log)
    assert len(log) == cfg.L  # one expand() call per round, covering every question
    assert [len(p) for p, _, _ in log] == [3 * cfg.B0] + [3 * cfg.K * cfg.B] * (cfg.L - 1)
    for t in trees:
        assert len(t.leaves()) == cfg.G == 2 + 3 * 1 * 2
        for leaf in t.leaves():
            assert leaf.n_tokens == len(leaf.response_ids()) <= CAP
            assert leaf.reward in (0.0, 1.0)
    # every request's prefix is the prompt + the exact ids of a node's path, and the
    # sampled continuation hangs below that node
    for prefixes, max_new, outs in log:
        for p, m, (ids, _) in zip(prefixes, max_new, outs):
            t = next(t for t in trees if p[:len(t.prompt_ids)] == t.prompt_ids)
            resp = p[len(t.prompt_ids):]
            assert m == CAP - len(resp)
            assert any(leaf.response_ids() == resp + ids for leaf in t.leaves())
    # token accounting: generated tokens are exactly what the expander returned
    stats = tree.tree_stats(trees, cfg)
    assert stats["gen_tokens"] == sum(len(ids) for _, _, outs in log for ids, _ in outs)
    assert stats["trajectories"] == 3 * cfg.G
    assert stats["traj_per_1k_tokens"] == pytest.approx(1000 * 3 * cfg.G / stats["gen_tokens"])
    assert sum(counts.values()) == 3 * cfg.G


def test_independent_is_grpo_sampling(tiny_model, tiny_tokenizer):
    cfg = TreeConfig(B0=6, L=1, strategy="independent", max_step_tokens=5)
    trees, _ = grow_tiny(tiny_model, tiny_tokenizer, cfg)
    for t in trees:
        assert len(t.root.children) == 6 and len(t.leaves()) == 6
        assert all(len(n.children) <= 1 for n in t.nodes() if n is not t.root)  # 6 separate chains
    cfg = TreeConfig(B0=2, L=3, K=1, B=2, strategy="independent")
    trees, _ = grow_tiny(tiny_model, tiny_tokenizer, cfg)
    assert all(len(t.root.children) == 6 for t in trees)


def test_seeded_runs_repeat_exactly(tiny_model, tiny_tokenizer):
    cfg = TreeConfig(B0=2, L=3, strategy="ib", max_step_tokens=6)
    a, _ = grow_tiny(tiny_model, tiny_tokenizer, cfg, seed=3)
    b, _ = grow_tiny(tiny_model, tiny_tokenizer, cfg, seed=3)
    c, _ = grow_tiny(tiny_model, tiny_tokenizer, cfg, seed=4)
    shape = lambda ts: [[(n.depth, tuple(n.ids)) for n in t.nodes()] for t in ts]
    assert shape(a) == shape(b) and shape(a) != shape(c)


def test_length_cap_nodes_never_branch(tiny_model, tiny_tokenizer):
    t = Tree([5], "1")
    full = t.root.add_child([7] * 10, [-1.0] * 10)  # its prefix already fills the cap
    full.add_child([8], [-1.0], terminal=True).reward = 0.0
    short = t.root.add_child([7] * 3, [-1.0] * 3)
    short.add_child([8], [-1.0], terminal=True).reward = 1.0
    t.update_values()
    assert tree.branchable(t, 10) == [t.root, short]


def test_values_on_hand_built_tree():
    t = Tree([1], "x")
    a = t.root.add_child([2], [0.0])
    a1 = a.add_child([3], [0.0], terminal=True)
    a2 = a.add_child([4], [0.0])
    a21 = a2.add_child([5], [0.0], terminal=True)
    b = t.root.add_child([6], [0.0], terminal=True)
    a1.reward, a21.reward, b.reward = 1.0, 0.0, 1.0
    t.update_values()
    assert (a1.V, a21.V, a2.V, a.V, b.V) == (1.0, 0.0, 0.0, 0.5, 1.0)
    assert t.root.V == pytest.approx(2 / 3)  # the mean over leaves, not over children
    trajs = ibtpo.trajectories(t)
    assert [tr.response_ids for tr in trajs] == [[2, 3], [2, 4, 5], [6]]
    assert [tr.step_index for tr in trajs] == [[0, 1], [0, 1, 2], [0]]
    assert trajs[1].steps == [a, a2, a21] and [tr.reward for tr in trajs] == [1.0, 0.0, 1.0]


def test_ib_strategy_picks_the_hand_computed_node():
    """Two candidate nodes besides the root; Eq. MC by hand (beta = 5):
    root: children x (V=1/2, p=0.5) and y (V=0, p=0.5), V(root)=1/3 (leaves 1,0,0):
      J = 1 + 5/2 * ((1.5 - 1.2) * 0.5 + (0 - 1.2) * 0.5) = 1 + 2.5 * (-0.45) = -0.125
    x: children x1 (V=1, p=0.9) and x2 (V=0, p=0.1), V(x) = 1/2:
      J = 1 + 5/2 * ((2 - 1.2) * 0.9 + (0 - 1.2) * 0.1) = 1 + 2.5 * 0.6 = 2.5
    y: one child (V=0, p=e^-2), V(y) = 0, ratio guard r = 1:
      J = 1 + 5 * (1 - 1.2) * e^-2 = 1 - e^-2 = 0.8647
    so `ib` with K = 1 must take x, with K = 2 x then y."""
    t = Tree([1], "x")
    x = t.root.add_child([2], [math.log(0.5)])
    y = t.root.add_child([3], [math.log(0.5)])
    x.add_child([4], [math.log(0.9)], terminal=True).reward = 1.0
    x.add_child([5], [math.log(0.1)], terminal=True).reward = 0.0
    y.add_child([6, 7], [-1.0, -3.0], terminal=True).reward = 0.0
    t.update_values()
    cfg = TreeConfig(beta=5.0)
    cands = tree.branchable(t, 100)
    assert cands == [t.root, x, y]
    scores = [ib_score.monte_carlo(*tree.mc_args(n, cfg)) for n in cands]
    assert scores == pytest.approx([-0.125, 2.5, 1 - math.exp(-2)])
    assert tree.pick_ib(cands, 1, random.Random(0), cfg) == [x]
    assert tree.pick_ib(cands, 2, random.Random(0), cfg) == [x, y]
    # entropy: y's next step has the highest surprisal (mean 2.0 nats)
    assert tree.pick_entropy(cands, 1, random.Random(0), cfg) == [y]
    assert tree.pick_independent(cands, 1, random.Random(0), cfg) == [t.root]


def test_ties_are_broken_by_the_seeded_rng():
    t = Tree([1], "x")
    kids = [t.root.add_child([2 + i], [math.log(0.5)]) for i in range(6)]
    for k in kids:
        k.add_child([9], [math.log(0.5)], terminal=True).reward = 1.0
    t.update_values()
    cands = kids  # all six score the same
    cfg = TreeConfig()
    picks = {tree.pick_ib(cands, 1, random.Random(s), cfg)[0] for s in range(30)}
    assert len(picks) > 1
    assert tree.pick_ib(cands, 1, random.Random(7), cfg) == tree.pick_ib(cands, 1, random.Random(7), cfg)


def test_stats_and_dump_on_hand_built_trees(tiny_tokenizer):
    tok = tiny_tokenizer
    t1 = Tree(tok("q1")["input_ids"], "1")
    a = t1.root.add_child(tok("ab")["input_ids"], [math.log(0.5)] * 2, terminal=True)
    b = t1.root.add_child(tok("c")["input_ids"], [math.log(0.25)], terminal=True)
    a.reward, b.reward = 1.0, 0.0
    t2 = Tree(tok("q2")["input_ids"], "2")
    c = t2.root.add_child(tok("d")["input_ids"], [0.0], terminal=True)
    c.reward = 0.0
    for t in (t1, t2):
        t.update_values()
    cfg = TreeConfig(beta=5.0)
    s = tree.tree_stats([t1, t2], cfg)
    assert s["gen_tokens"] == 4 and s["trajectories"] == 3
    assert s["avg_rate"] == pytest.approx(1 / 3)
    assert s["eff_rate"] == 0.5  # t1 has mixed rewards, t2 does not
    # only t1's root is a branch point: children V (1, 0), V(root) = 0.5, eta2 = (0.5, 0.25)
    args = ([1.0, 0.0], 0.5, [0.5, 0.25], 5.0)
    assert s["ib_score"] == pytest.approx(ib_score.monte_carlo(*args))
    assert (s["ib_exploration"], s["ib_exploitation"]) == pytest.approx(ib_score.mc_terms(*args))
    assert s["cov_eta"] == pytest.approx(ib_score.cov_eta(*args))
    import plots
    text = plots.dump(plots.to_record(t1, tok, cfg))
    assert text.count("\n") == 3 and "R=1" in text and "'ab'" in text and "J=" in text


def test_trees_round_trip_through_their_json_records(tiny_model, tiny_tokenizer, tmp_path):
    """A grown tree, advantages set, written as a trees.jsonl line and read back:
    every node keeps its place, ids, log-probs, round, V, A_GL, A_IB, A and R, and the
    record of the tree read back is the record written."""
    import json
    import plots
    cfg = TreeConfig(B0=2, L=4, K=1, B=1, strategy="ib", max_step_tokens=6)
    trees, _ = grow_tiny(tiny_model, tiny_tokenizer, cfg, n_questions=2)
    for t in trees:
        ibtpo.compute_advantages(t, beta=5.0, lam=0.1)
    records = [plots.to_record(t, tiny_tokenizer, cfg) for t in trees]
    plots.write_trees(str(tmp_path), records, n_text=2)
    lines = (tmp_path / "trees.jsonl").read_text().splitlines()
    back = [plots.from_record(json.loads(line)) for line in lines]
    for t, u in zip(trees, back):
        assert [(n.ids, n.logps, n.depth, n.round, n.terminal, n.reward, n.V, n.A_GL, n.A_IB, n.A, n.n_tokens)
                for n in t.nodes()] == [(n.ids, n.logps, n.depth, n.round, n.terminal, n.reward, n.V, n.A_GL,
                                         n.A_IB, n.A, n.n_tokens) for n in u.nodes()]
        assert [t.nodes().index(n.parent) if n.parent else None for n in t.nodes()] == \
            [u.nodes().index(n.parent) if n.parent else None for n in u.nodes()]
    assert [plots.to_record(u, tiny_tokenizer, cfg) for u in back] == [json.loads(line) for line in lines]
    rounds = sorted({n["round"] for n in records[0]["nodes"][1:]})
    assert rounds[0] == 0 and rounds[-1] <= cfg.L - 1 and len(rounds) > 1  # branches carry their round
    assert (tmp_path / "trees.png").stat().st_size > 10_000
    assert (tmp_path / "trees.txt").read_text().count("question:") == 2


def test_the_picture_shows_the_tree_with_a_decision():
    """most_telling puts mixed rewards first, then more branch points."""
    import plots

    def record(rewards, branch_points):
        nodes = [{"id": 0, "parent": None, "terminal": False, "R": None}]
        for k, r in enumerate(rewards):  # leaves under the root; `branch_points` of them under node 1 instead
            nodes.append({"id": k + 1, "parent": 1 if 1 < k + 1 <= 1 + branch_points else 0,
                          "terminal": True, "R": r})
        nodes[1]["terminal"] = False
        return {"nodes": nodes}
    records = [record([1, 1, 1, 1], 2), record([1, 0, 1, 1], 0), record([0, 1, 0, 1], 2), record([1, 1], 0)]
    assert plots.most_telling(records) == [2, 1, 0, 3]
