"""Rollout engines: what tree.grow() asks for continuations (submit / busy / step).

Lockstep, the plain engine, answers every round with one HF `generate` call: each
round decodes until its longest response ends, finished rows keep riding along
as padding, and IBTree's L rounds run one after another (PAPER.md section 4;
the paper itself used vLLM with continuous batching).

Decoder is a small continuous-batching loop over a pool of at most max_rows
sequences, all in one KV cache:
  - each step feeds the last token of every live row (one forward, B x 1);
  - a row leaves the pool the moment it samples EOS or uses its budget, and its
    result goes back to grow(), which verifies the question's round as soon as
    all its rows are back and submits that question's next round;
  - waiting requests join between steps, later rounds first (grow() passes the
    round as priority: a question deep in its tree is on the critical path),
    prefilled together (left padded, at most prefill_tokens prefix tokens per
    prefill), their KV cache left-padded to the pool's length and appended on
    the batch axis.
    Left columns that are padding in every row are dropped as rows leave.
So a question whose round is done starts its next round while other
questions' long responses are still decoding, and the pool stays full.

Sampling is the same as generate's (temperature, then top-k, then top-p, one
torch.multinomial draw per row from the global RNG; greedy when temperature is
0): a single sequence gets exactly the tokens generate would give it for the
same seed, and greedy decoding gives identical tokens whatever the batch
(tests/test_engine.py). With several rows the draws are the same distribution,
not the same numbers, since the batch composition differs from generate's.
Log-probs are recorded as tree.generate_expander records them: the
temperature-scaled distribution over the tokenizer's vocabulary, one (B, V)
step at a time; ids past the vocabulary (Qwen's padded embedding) are never
sampled.

What it does not do: share KV blocks between branches of one tree (each
request prefills its whole prefix, a cost that is small next to decoding), or
page the cache. Models with sliding-window layers need rollout_engine: lockstep.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tree import Sampling, left_pad


def sample(logits: torch.Tensor, vocab: int, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V_model) -> tokens (B,), their log-probs (B,) under the
    temperature-scaled policy over the first `vocab` ids, as generate samples."""
    scores = logits.float()                                   # (B, V_model)
    scores[:, vocab:] = -float("inf")
    if sampling.temperature <= 0:
        tok = scores.argmax(-1)
        return tok, F.log_softmax(scores, -1).gather(1, tok[:, None]).squeeze(1)
    scores = scores / sampling.temperature
    policy = F.log_softmax(scores, -1)                        # (B, V_model) before the sampler's cut
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[:, -1] = False                                   # keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    tok = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
    return tok, policy.gather(1, tok[:, None]).squeeze(1)


class Lockstep:
    """The rollout engine of the plain path: every request submitted since the
    last step() is answered by ONE expand() call. Driven by grow(), this is one
    batched generate per round covering every question."""

    def __init__(self, expand):
        self.expand, self.queue = expand, []

    def submit(self, key, prefix: list[int], max_new: int, priority: int = 0) -> None:
        self.queue.append((key, prefix, max_new))  # one call takes everything: no order to choose

    def busy(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[tuple]:
        queue, self.queue = self.queue, []
        outs = self.expand([p for _, p, _ in queue], [m for _, _, m in queue])
        return [(key, ids, lp) for (key, _, _), (ids, lp) in zip(queue, outs)]


@dataclass
class _Row:
    key: object
    budget: int
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)


class Decoder:
    """A continuously refilled pool of at most max_rows sequences."""

    def __init__(self, model, tokenizer, sampling: Sampling, max_rows: int = 128, prefill_tokens: int = 32768):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
            raise ValueError("engine.Decoder keeps one full KV cache; use rollout_engine: lockstep for "
                             f"sliding-window models ({type(model.config).__name__})")
        self.model, self.sampling, self.max_rows = model, sampling, max_rows
        self.prefill_tokens = prefill_tokens  # bounds one prefill's activations (one request always fits)
        self.vocab, self.eos, self.pad = len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id
        self.device = next(model.parameters()).device
        self.queue: list = []         # heap of (-priority, order, key, prefix, max_new) not yet in the pool
        self.order = itertools.count()
        self.rows: list[_Row] = []
        self.cache = None             # DynamicCache over the pool, (B, heads, T, head_dim) per layer
        self.mask = None              # (B, T) 1 where the cache holds a real token
        self.last = None              # (B,) sampled token not yet fed
        self.pos = None               # (B,) its position id

    def submit(self, key, prefix: list[int], max_new: int, priority: int = 0) -> None:
        """Queue a request; higher priority joins the pool first, ties in order."""
        if max_new < 1:
            raise ValueError(f"max_new must be >= 1, got {max_new}")
        heapq.heappush(self.queue, (-priority, next(self.order), key, list(prefix), max_new))

    def busy(self) -> bool:
        return bool(self.queue or self.rows)

    @torch.no_grad()
    def step(self) -> list[tuple]:
        """Admit waiting requests, decode one token for every row; return the
        rows that finished as (key, new_ids, logps)."""
        free = self.max_rows - len(self.rows)
        # Admitting costs a copy of the pool's cache: wait for a few free slots
        # unless the pool is running dry or the queue is short.
        if self.queue and free and (free >= min(len(self.queue), max(1, self.max_rows // 8))
                                    or len(self.rows) < self.max_rows // 2):
            take, tokens = [], 0
            while self.queue and len(take) < free:
                tokens += len(self.queue[0][3])  # the next request's prefix
                if take and tokens > self.prefill_tokens:
                    break
                take.append(heapq.heappop(self.queue)[2:])
            self._admit(take)
        done = self._retire()
        if not self.rows:
            return done
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)  # (B, T + 1)
        out = self.model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                         cache=self.cache, use_cache=True)  # the cache grows in place
        self.last, logp = sample(out.logits[:, -1], self.vocab, self.sampling)
        self._take(self.last, logp, self.rows)
        self.pos = self.pos + 1
        return done + self._retire()

    def _take(self, tok: torch.Tensor, logp: torch.Tensor, rows: list[_Row]) -> None:
        """Append each row's sampled token; it is fed at the next step."""
        for row, t, lp in zip(rows, tok.tolist(), logp.tolist()):
            row.ids.append(t)
            row.logps.append(lp)

    def _admit(self, requests: list[tuple]) -> None:
        """Prefill new requests in one left-padded batch and join them to the pool."""
        ids, mask = left_pad([p for _, p, _ in requests], self.pad)
        ids, mask, width = ids.to(self.device), mask.to(self.device), ids.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)                        # (n, W)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1)
        new = [_Row(key, budget) for key, _, budget in requests]
        if self.rows:  # left-pad the shorter of (pool, newcomers) and stack on the batch axis
            T = max(self.mask.shape[1], width)
            for old_layer, new_layer in zip(self.cache.layers, cache.layers):
                for name in ("keys", "values"):
                    a, b = getattr(old_layer, name), getattr(new_layer, name)  # (B, H, T_a, D), (n, H, W, D)
                    setattr(old_layer, name, torch.cat([F.pad(a, (0, 0, T - a.shape[2], 0)),
                                                        F.pad(b, (0, 0, T - b.shape[2], 0))]))
            self.mask = torch.cat([F.pad(self.mask, (T - self.mask.shape[1], 0)), F.pad(mask, (T - width, 0))])
            self.pos = torch.cat([self.pos, pos[:, -1] + 1])
        else:
            self.cache, self.mask, self.pos = cache, mask, pos[:, -1] + 1
        tok, logp = sample(out.logits[:, -1], self.vocab, self.sampling)
        self._take(tok, logp, new)
        self.rows += new
        self.last = tok if self.last is None else torch.cat([self.last, tok])

    def _retire(self) -> list[tuple]:
        """Drop finished rows from the pool (and all-padding columns with them)."""
        finished = [r.ids[-1] == self.eos or len(r.ids) >= r.budget for r in self.rows]
        if not any(finished):
            return []
        done = [(r.key, r.ids, r.logps) for r, f in zip(self.rows, finished) if f]
        keep = [i for i, f in enumerate(finished) if not f]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.last = self.pos = None
            return done
        idx = torch.tensor(keep, device=self.device)
        self.mask, self.last, self.pos = self.mask[idx], self.last[idx], self.pos[idx]
        first = int(self.mask.any(0).nonzero()[0])  # leading columns that are padding for every row
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]
        return done
