"""IBTree: the step tree, its batched expander, and the branching strategies.

METHOD.md sections 1, 2 and 4. A question q is the root of a tree; every node
below it is one reasoning step, the exact token ids the policy sampled (never
re-tokenized text). A step ends at the first token boundary at or after the end
of each "\\n\\n" in the decoded response (split_steps), or after
max_step_tokens tokens. A leaf is a finished response (EOS or the length cap)
with its outcome reward R; V(n) = mean R of the leaves below n (section 2).

IBTree with (B0, L, K, B) (section 4):
  1. sample B0 full responses from every question's root;
  2. L - 1 times: score every branchable node with a strategy, take the top K,
     sample B full continuations of each chosen prefix;
  3. verify, update V.
Trajectories per question G = B0 + (L - 1) * K * B. A question starts its
next round when its current one is verified; the rollout engine decides how
requests share the hardware (engine.Lockstep: one batched generate per round
across all questions; engine.Decoder: one continuously refilled decode loop).

The `ib` strategy ranks nodes by Eq. MC of ib_score.py:
  J(n) = 1 + (beta / m) * sum_c (V(c)/V(n) - 1 - 1/beta) * pi(c | prefix(n)).
A strategy is a plain function (candidates, k, rng, cfg) -> chosen nodes;
adding one is writing one function and naming it in STRATEGIES.

The expander `generate_expander(..., prefixes, max_new) -> [(new_ids, logps)]`
is one HF `generate` call; engine.Lockstep makes it an engine for grow().
"""
from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, field

import torch

import ib_score


@dataclass(eq=False)  # identity semantics: nodes are hashable and never compared by value
class Node:
    """One reasoning step (METHOD.md section 1). The root holds no step (ids == [])."""
    ids: list[int]                      # token ids of this step, exactly as sampled
    logps: list[float]                  # their log-probs under the rollout policy (at the sampling temperature)
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    terminal: bool = False              # the response ended inside this step (EOS or length cap)
    reward: float | None = None         # outcome reward R on terminal nodes
    V: float = 0.0                      # mean leaf reward in the subtree (METHOD.md section 2)
    depth: int = 0                      # 0 for the root
    n_tokens: int = 0                   # response tokens from the root through this step
    round: int = 0                      # the IBTree round whose continuation sampled this step
    # filled by ibtpo.compute_advantages (Eq. GL, Eq. LOCAL, Eq. ADV)
    A_GL: float = 0.0
    A_IB: float = 0.0
    A: float = 0.0

    def add_child(self, ids: list[int], logps: list[float], terminal: bool = False, round: int = 0) -> Node:
        child = Node(ids=list(ids), logps=list(logps), parent=self, terminal=terminal,
                     depth=self.depth + 1, n_tokens=self.n_tokens + len(ids), round=round)
        self.children.append(child)
        return child

    def path(self) -> list[Node]:
        """Step nodes from the root's child down to this node (the root excluded)."""
        out, n = [], self
        while n.parent is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    def response_ids(self) -> list[int]:
        return [t for n in self.path() for t in n.ids]


def step_prob(node: Node, mode: str = "mean") -> float:
    """pi(step | prefix): DECISION step_prob (METHOD.md section 7).

    "mean": exp(mean token log-prob), the per-token geometric mean (default);
    "joint": exp(sum of token log-probs), the exact product.
    """
    if not node.logps:
        return 1.0
    s = sum(node.logps)
    if mode == "mean":
        return math.exp(s / len(node.logps))
    if mode == "joint":
        return math.exp(s)
    raise ValueError(f"step_prob must be 'mean' or 'joint', got {mode!r}")


@dataclass(eq=False)
class Tree:
    """The tree of one question: the prompt ids, the gold answer and the root."""
    prompt_ids: list[int]
    answer: str
    root: Node = field(default_factory=lambda: Node(ids=[], logps=[]))

    def nodes(self) -> list[Node]:
        """Every node, the root first, depth-first."""
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(reversed(n.children))
        return out

    def leaves(self) -> list[Node]:
        return [n for n in self.nodes() if n.terminal]

    def update_values(self) -> None:
        """V(n) = mean reward of the leaves below n (METHOD.md section 2), bottom-up.
        A loop over the nodes deepest first, not a recursion: a response can have
        thousands of steps (a base model emitting blank lines)."""
        totals: dict[Node, tuple[float, int]] = {}  # node -> (sum of leaf rewards below, leaves below)
        for n in sorted(self.nodes(), key=lambda n: -n.depth):
            if n.terminal:
                total, count = float(n.reward if n.reward is not None else 0.0), 1
            else:
                total = sum(totals[c][0] for c in n.children)
                count = sum(totals[c][1] for c in n.children)
            totals[n] = (total, count)
            n.V = total / count if count else 0.0

    def leaf_counts(self) -> dict[Node, int]:
        """Number of leaves below each node (a leaf counts itself), deepest first."""
        counts: dict[Node, int] = {}
        for n in sorted(self.nodes(), key=lambda n: -n.depth):
            counts[n] = 1 if n.terminal else sum(counts[c] for c in n.children)
        return counts


# ----------------------------------------------------------------------------
# Step splitting (METHOD.md section 1)

_PIECES: dict[int, dict[int, str]] = {}  # id(tokenizer) -> token id -> decoded text


def _piece(tokenizer, token_id: int) -> str:
    """Decoded text of one token, cached: byte-level pieces of a multi-byte
    character decode to U+FFFD, which never matters since we only look for "\\n"."""
    cache = _PIECES.setdefault(id(tokenizer), {})
    s = cache.get(token_id)
    if s is None:
        s = cache[token_id] = tokenizer.decode([token_id], skip_special_tokens=True)
    return s


def split_steps(ids: list[int], tokenizer, max_step_tokens: int = 0, sep: str = "\n\n") -> list[list[int]]:
    """Cut `ids` into steps after the token holding the end of each `sep`
    (matched on the decoded text, left to right, non-overlapping) and after every
    max_step_tokens tokens of a step (0: no cap). The steps concatenate to `ids`."""
    pieces = [_piece(tokenizer, t) for t in ids]
    ends = list(itertools.accumulate(len(p) for p in pieces))  # char offset where token i ends
    text = "".join(pieces)
    cuts, j = set(), text.find(sep)
    while j >= 0:
        # the first token boundary at or after the end of the match
        cuts.add(bisect.bisect_left(ends, j + len(sep)))
        j = text.find(sep, j + len(sep))
    steps, cur = [], []
    for i, t in enumerate(ids):
        cur.append(t)
        if i in cuts or len(cur) == max_step_tokens:
            steps.append(cur)
            cur = []
    if cur:
        steps.append(cur)
    return steps


# ----------------------------------------------------------------------------
# The expander: prefixes in, continuations and their log-probs out

@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 20              # 0 disables; passed explicitly (HF applies 50 when given nothing)
    max_response_tokens: int = 2048


class _RecordLogprobs:
    """A logits processor that (1) forbids ids past the tokenizer's vocabulary
    (Qwen pads its embedding matrix beyond it) and (2) records the log-prob of
    every sampled token under the temperature-scaled distribution, one (N, V)
    step at a time: never a (N x T x V) tensor. Top-k/top-p truncation is not
    part of these log-probs (they describe the policy, not the sampler's cut)."""

    def __init__(self, vocab: int, temperature: float):
        self.vocab, self.temperature = vocab, temperature
        self.prev = None   # (N, V) log-probs of the step whose token is not yet known
        self.out = []      # list of (N,) log-probs, one per generated token

    def __call__(self, input_ids, scores):
        if self.prev is not None:  # input_ids[:, -1] is the token sampled from self.prev
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        scores[:, self.vocab:] = -float("inf")
        self.prev = torch.log_softmax(scores / self.temperature, dim=-1)  # (N, V) float32
        return scores

    def finish(self, last_tokens):
        self.out.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.out, dim=1)  # (N, T_new)


class _RowBudget:
    """Stops each row once it has generated its own budget of new tokens."""

    def __init__(self, start: int, budget: torch.Tensor):
        self.start, self.budget = start, budget  # budget: (N,)

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.start) >= self.budget


def left_pad(prefixes: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, W) left-padded with `pad`, and their attention mask (N, W)."""
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_expander(model, tokenizer, sampling: Sampling,
                      prefixes: list[list[int]], max_new: list[int]) -> list[tuple[list[int], list[float]]]:
    """One batched HF `generate` call over every prefix (left padded). Each row
    runs to EOS or to its own max_new tokens. Returns, per prefix, the new token
    ids (EOS included when sampled) and their rollout log-probs.

    The sampler is exactly `sampling`: generate() fills every setting it is not
    given from the checkpoint's generation_config.json (Qwen2.5-Instruct ships
    repetition_penalty 1.05; others set no-repeat n-grams, min lengths, bad or
    suppressed words, forced tokens, beams), which would sample from another
    distribution than the log-probs recorded here describe. So the call sees a
    blank model generation config and a complete one of ours."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(prefixes, pad)
    width = input_ids.shape[1]
    budget = torch.tensor(max_new, device=device)
    greedy = sampling.temperature <= 0
    recorder = _RecordLogprobs(len(tokenizer), 1.0 if greedy else sampling.temperature)
    ours = GenerationConfig(max_new_tokens=max(max_new), do_sample=not greedy, num_beams=1,
                            temperature=1.0 if greedy else sampling.temperature,
                            top_k=0 if greedy else sampling.top_k, top_p=1.0 if greedy else sampling.top_p,
                            pad_token_id=pad, eos_token_id=eos)
    checkpoints, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=ours,
            synced_gpus=False,  # HF would lock-step FSDP ranks every token; the trainer gathers weights first
            logits_processor=LogitsProcessorList([recorder]),
            stopping_criteria=StoppingCriteriaList([_RowBudget(width, budget)]))
    finally:
        model.generation_config = checkpoints
    new = out[:, width:]                                  # (N, T_new)
    logps = recorder.finish(new[:, -1])[:, :new.shape[1]]  # (N, T_new)
    new, logps = new.tolist(), logps.tolist()
    results = []
    for row, lp, cap in zip(new, logps, max_new):
        n = min(cap, len(row))
        if eos in row[:n]:
            n = row.index(eos) + 1
        results.append((row[:n], lp[:n]))
    return results


# ----------------------------------------------------------------------------
# Branching strategies: (candidates, k, rng, cfg) -> the nodes to branch

@dataclass
class TreeConfig:
    B0: int = 4                  # independent responses per question in round 0
    L: int = 9                   # rounds in all (round 0 included)
    K: int = 1                   # nodes branched per question per later round
    B: int = 1                   # continuations sampled from each chosen node
    strategy: str = "ib"         # a key of STRATEGIES
    beta: float = 5.0
    step_prob: str = "mean"      # DECISION step_prob (METHOD.md section 7)
    max_step_tokens: int = 512   # cap on a step's length (0: none); the paper splits at "\n\n" only

    @property
    def G(self) -> int:
        return self.B0 + (self.L - 1) * self.K * self.B


def mc_args(n: Node, cfg: TreeConfig):
    return [c.V for c in n.children], n.V, [step_prob(c, cfg.step_prob) for c in n.children], cfg.beta


def _top_k(candidates: list[Node], scores: list[float], k: int, rng: random.Random) -> list[Node]:
    """The k highest scores; ties broken by the seeded rng (shuffle, then a stable sort)."""
    order = list(range(len(candidates)))
    rng.shuffle(order)
    order.sort(key=lambda i: -scores[i])
    return [candidates[i] for i in order[:k]]


def pick_ib(candidates, k, rng, cfg):
    """IB-guided (METHOD.md section 4): the top-k nodes by Eq. MC."""
    return _top_k(candidates, [ib_score.monte_carlo(*mc_args(n, cfg)) for n in candidates], k, rng)


def pick_entropy(candidates, k, rng, cfg):
    """TreeRL-like: branch where the policy was least confident, i.e. the nodes
    whose next steps have the highest mean token surprisal -log p."""
    def surprisal(n):
        lp = [x for c in n.children for x in c.logps]
        return -sum(lp) / max(len(lp), 1)
    return _top_k(candidates, [surprisal(n) for n in candidates], k, rng)


def pick_random(candidates, k, rng, cfg):
    return rng.sample(candidates, min(k, len(candidates)))


def pick_independent(candidates, k, rng, cfg):
    """Always the root: every round adds independent responses (GRPO sampling)."""
    return [candidates[0]] * k  # candidates[0] is the root (Tree.nodes() lists it first)


STRATEGIES = {"ib": pick_ib, "entropy": pick_entropy, "random": pick_random, "independent": pick_independent}


def branchable(tree: Tree, max_response_tokens: int) -> list[Node]:
    """Non-leaf nodes whose prefix leaves room to continue; the root first."""
    return [n for n in tree.nodes() if not n.terminal and n.n_tokens < max_response_tokens]


# ----------------------------------------------------------------------------
# Growing the trees of a batch

def attach(tree: Tree, node: Node, new_ids: list[int], logps: list[float], tokenizer, cfg: TreeConfig,
           round: int = 0) -> Node:
    """Hang a sampled continuation under `node` as a chain of steps; return its leaf."""
    i = 0
    for step in split_steps(new_ids, tokenizer, cfg.max_step_tokens):
        node = node.add_child(step, logps[i:i + len(step)], round=round)
        i += len(step)
    node.terminal = True
    return node


def grow(prompts: list[list[int]], answers: list[str], engine, reward_fn, tokenizer,
         cfg: TreeConfig, max_response_tokens: int, rng: random.Random) -> tuple[list[Tree], dict]:
    """Build one tree per question with IBTree (B0, L, K, B). Each question
    moves to its next round as soon as all continuations of its current round
    are back: with engine.Lockstep that is one expand() per round for all questions;
    with engine.Decoder a question never waits for another's long responses.
    engine: submit(key, prefix, max_new, priority, reuse, keep), busy(), step() ->
    [(key, ids, logps)], release(keys); the priority is the question's round
    (later rounds are more urgent); keep asks the engine to hold a request's KV
    cache for later branches, reuse names the request that generated the newest
    leaf below the branch node, and a complete tree's requests are released.
    reward_fn(texts, answers) -> (rewards, counts); returns the trees and the
    verifier's counts summed over calls."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {cfg.strategy!r}")
    pick = STRATEGIES[cfg.strategy]
    trees = [Tree(list(p), a) for p, a in zip(prompts, answers)]
    rounds = [0] * len(trees)                # rounds started, per question
    waiting = [0] * len(trees)               # continuations still out, per question
    fresh: list[list[Node]] = [[] for _ in trees]  # leaves of the current round
    rngs = [random.Random(rng.getrandbits(64)) for _ in trees]  # picks never depend on the engine's timing
    made_by: dict[Node, tuple] = {}          # leaf -> the request that generated it
    verifier, count = {}, itertools.count()

    def next_round(i: int) -> None:
        t = trees[i]
        if rounds[i] == 0:
            chosen = [t.root] * cfg.B0
        elif rounds[i] < cfg.L:
            chosen = [n for n in pick(branchable(t, max_response_tokens), cfg.K, rngs[i], cfg) for _ in range(cfg.B)]
        else:
            chosen = []
        if not chosen:  # this tree is complete: its kept caches can go
            engine.release([made_by[leaf] for leaf in t.leaves()])
        rounds[i] += 1
        waiting[i] = len(chosen)
        for n in chosen:
            leaf = n  # the newest leaf below n: its request's tokens start with n's prefix
            while leaf.children:
                leaf = leaf.children[-1]
            engine.submit((i, n, next(count)), t.prompt_ids + n.response_ids(), max_response_tokens - n.n_tokens,
                          rounds[i], reuse=made_by.get(leaf), keep=rounds[i] < cfg.L)

    try:
        for i in range(len(trees)):
            next_round(i)
        while engine.busy():
            for key, ids, logps in engine.step():
                i, node, _ = key
                if not math.isfinite(sum(logps)):  # would reach the IB-Score (eta2) and A_IB as NaN
                    raise FloatingPointError("the policy produced NaN log-probs in the rollout")
                leaf = attach(trees[i], node, ids, logps, tokenizer, cfg, round=rounds[i] - 1)
                made_by[leaf] = key
                fresh[i].append(leaf)
                waiting[i] -= 1
            done = [i for i in range(len(trees)) if fresh[i] and not waiting[i]]
            leaves = [leaf for i in done for leaf in fresh[i]]
            if not leaves:
                continue
            texts = tokenizer.batch_decode([leaf.response_ids() for leaf in leaves], skip_special_tokens=True)
            rewards, counts = reward_fn(texts, [trees[i].answer for i in done for _ in fresh[i]])
            for key, v in counts.items():
                verifier[key] = verifier.get(key, 0) + v
            for leaf, r in zip(leaves, rewards):
                leaf.reward = float(r)
            for i in done:
                trees[i].update_values()
                fresh[i] = []
                next_round(i)
    finally:  # nothing stays kept in an engine that outlives this call (say the verifier failed)
        engine.release(list(made_by.values()))
    return trees, verifier


# ----------------------------------------------------------------------------
# Bookkeeping: the batch metrics of METHOD.md section 8 (a tree as JSON and its picture: plots.py)

def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def tree_stats(trees: list[Tree], cfg: TreeConfig) -> dict:
    """Batch averages. The IB diagnostics are Eq. MC and its two terms at every
    branch point (a node with >= 2 children: the only places a next-step
    distribution is observed), averaged per tree, then over trees."""
    gen = sum(len(n.ids) for t in trees for n in t.nodes())  # every step was generated once
    leaves = [t.leaves() for t in trees]
    n_traj = sum(len(ls) for ls in leaves)
    ib, explore, exploit, cov = [], [], [], []
    for t in trees:
        points = [n for n in t.nodes() if len(n.children) >= 2]
        if not points:
            continue
        args = [mc_args(n, cfg) for n in points]
        ib.append(_mean([ib_score.monte_carlo(*a) for a in args]))
        terms = [ib_score.mc_terms(*a) for a in args]
        explore.append(_mean([x for x, _ in terms]))
        exploit.append(_mean([y for _, y in terms]))
        cov.append(_mean([ib_score.cov_eta(*a) for a in args]))
    rewards = [leaf.reward for ls in leaves for leaf in ls]
    return {
        "gen_tokens": gen, "trajectories": n_traj,
        "traj_per_1k_tokens": 1000.0 * n_traj / max(gen, 1),
        "avg_rate": _mean(rewards),  # mean leaf reward
        "eff_rate": _mean([float(len({leaf.reward for leaf in ls}) > 1) for ls in leaves]),
        "ib_score": _mean(ib), "ib_exploration": _mean(explore),
        "ib_exploitation": _mean(exploit), "cov_eta": _mean(cov),
    }
