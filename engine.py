"""Rollout engines: what tree.grow() asks for continuations (submit / busy / step).

Lockstep, the plain engine, answers every round with one HF `generate` call: each
round decodes until its longest response ends, finished rows keep riding along
as padding, and IBTree's L rounds run one after another (METHOD.md section 4;
the paper itself used vLLM with continuous batching).

Decoder is a small continuous-batching loop over a pool of at most max_rows
sequences, all in one KV cache, one row (slot) per sequence:
  - each step feeds the last token of every row (one forward, B x 1);
  - a row finishes the moment it samples EOS or uses its budget: its result
    goes back to grow(), which verifies the question's round as soon as all
    its rows are back and submits that question's next round, and its slot is
    free;
  - waiting requests join between steps, later rounds first (grow() passes the
    round as priority: a question deep in its tree is on the critical path),
    prefilled together (left padded, at most prefill_tokens prefix tokens per
    forward); each newcomer's cache is written into a free slot, right-aligned.
So a question whose round is done starts its next round while other
questions' long responses are still decoding, and the pool stays full.
The cache is copied only when it must be (DynamicCache, which generate uses,
copies all of it every step): a step writes its column in place, newcomers go
into free slots, and columns that are padding in every row leave the view (a
moving left edge, which widens again for a longer newcomer). The pool is
packed anew (one copy) when free slots pass 1/8 of it (they still compute),
when newcomers do not fit, and every `spare` (128) steps.
A branch need not prefill its prefix again (reuse_prefix_kv, on by default):
grow() has the Decoder keep the cache of each finished request of a tree with
rounds to come (keep=True) and names, with each branch, the request that
generated the newest leaf below the branch node (reuse=key), whose tokens
start with the branch's prefix: those cache columns are copied and the branch
feeds only the prefix's last token (so its first new token comes one step
later than after a prefill). A kept request stores only the columns it added
to what it copied (a tree's shared prefixes about once), until grow()
releases the tree. Greedy tokens are the same with and without reuse (tested).
Sampling is generate's (temperature, top-k, top-p, then torch.multinomial's
draw from the global RNG; greedy at temperature 0): one sequence gets exactly
generate's tokens for a seed, greedy decoding gives identical tokens whatever
the batch (tests/test_engine.py), and several rows get the same distribution.
With top-k on, top-p sorts only the k candidates, not the vocabulary (Qwen's
152k ids); the random draw still spans the vocabulary, which keeps generate's
tokens. Log-probs are those of tree.generate_expander: the temperature-scaled
distribution over the tokenizer's vocabulary (ids past it, as in Qwen's padded
embedding, are never sampled).

Not done: paging the cache (rows of different lengths share one width, so
attention also reads left padding: bench.py rollout prints how much), and
sharing cache memory between rows (a branch's copied prefix is a copy).
Models with sliding-window layers need rollout_engine: lockstep.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

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
    ids = None  # the candidate ids, ascending, once top-k has cut the row to k of them
    if 0 < sampling.top_k < vocab:
        kept, ids = torch.topk(scores, sampling.top_k)        # (B, k)
        if bool((scores >= kept[:, -1:]).sum(-1).max() == sampling.top_k):
            ids, order = ids.sort(-1)
            scores = kept.gather(1, order)                    # (B, k): top-p sorts k scores, not V
        else:  # a tie at the k-th score: generate keeps every tied id, so cut the whole row
            scores, ids = scores.masked_fill(scores < kept[:, -1:], -float("inf")), None
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[:, -1] = False                                   # keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    # torch.multinomial(probs, 1) is argmax(probs / q) with q ~ Exp(1) drawn for every id of
    # the row. Drawing q for the whole row keeps generate's random stream (same seed, same
    # token) while only the candidates are compared.
    q = torch.empty_like(policy).exponential_()               # (B, V_model)
    if ids is not None:
        q = q.gather(1, ids)                                  # (B, k)
    pick = (scores.softmax(-1) / q).argmax(-1, keepdim=True)  # (B, 1)
    tok = (pick if ids is None else ids.gather(1, pick)).squeeze(1)
    return tok, policy.gather(1, tok[:, None]).squeeze(1)


class Lockstep:
    """The rollout engine of the plain path: every request submitted since the
    last step() is answered by ONE expand() call. Driven by grow(), this is one
    batched generate per round covering every question."""

    def __init__(self, expand):
        self.expand, self.queue = expand, []

    def submit(self, key, prefix: list[int], max_new: int, priority: int = 0, reuse=None, keep: bool = False) -> None:
        self.queue.append((key, prefix, max_new))  # one call takes everything: no order to choose

    def release(self, keys) -> None:
        """Nothing to free: generate keeps no cache between calls."""

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
    keep: bool = False            # keep its KV when it finishes, for later branches
    parent: object = None         # the kept row its first `start` cached tokens were copied from
    start: int = 0
    seq: list[int] = field(default_factory=list)  # its prefix
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)


class _Layer(DynamicLayer):
    """One layer of the pool's cache. DynamicLayer concatenates at every decode
    step, a copy of the whole cache per token. This one holds buffers with room
    to spare, and keys / values are views of them, columns lo to lo + width:
    a step writes its column in place (`spare` free columns after the last),
    rows join by writing only their own cache into free slots (write()), and
    the view narrows or widens on the left without a copy (window()).
    place() packs rows into new buffers: a copy of the pool."""
    spare = 128

    def update(self, key_states, value_states, *args, **kwargs):
        B, T, n = key_states.shape[0], self.get_seq_length(), key_states.shape[-2]
        if self.lo + T + n > self.kbuf.shape[2]:
            self.place([(self.keys, self.values)], T, self.kbuf.shape[0])  # out of spare columns: one copy
        end = self.lo + T
        self.kbuf[:B, :, end:end + n], self.vbuf[:B, :, end:end + n] = key_states, value_states
        self.keys, self.values = self.kbuf[:B, :, self.lo:end + n], self.vbuf[:B, :, self.lo:end + n]
        return self.keys, self.values

    def place(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int, slots: int) -> None:
        """New buffers of `slots` rows holding each (keys, values) of `parts`
        from row 0 on, right-aligned to `width` columns, then `spare` free
        columns. Zero-filled: what a row does not hold is masked, but must not be NaN."""
        if not self.is_initialized:
            self.lazy_initialization(*parts[0])
        k0, v0 = parts[0]
        kbuf = k0.new_zeros(slots, k0.shape[1], width + self.spare, k0.shape[3])  # (slots, heads, T + spare, head_dim)
        vbuf = v0.new_zeros(slots, v0.shape[1], width + self.spare, v0.shape[3])
        row = 0
        for k, v in parts:
            b = k.shape[0]
            kbuf[row:row + b, :, width - k.shape[2]:width] = k
            vbuf[row:row + b, :, width - v.shape[2]:width] = v
            row += b
        self.kbuf, self.vbuf, self.lo = kbuf, vbuf, 0
        self.keys, self.values = kbuf[:row, :, :width], vbuf[:row, :, :width]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows k, v (n, heads, w <= width, head_dim) into `slots` (n,) of the
        view, right-aligned (columns left of them keep what they held: masked)."""
        end = self.lo + self.keys.shape[2]
        self.kbuf[slots, :, end - k.shape[2]:end] = k
        self.vbuf[slots, :, end - v.shape[2]:end] = v

    def window(self, first: int, B: int) -> None:
        """The view from column `first` of the current one (negative: widen to
        the left, into columns the view dropped or place() zeroed), over slots :B."""
        end = self.lo + self.keys.shape[2]
        self.lo += first
        self.keys, self.values = self.kbuf[:B, :, self.lo:end], self.vbuf[:B, :, self.lo:end]


class Decoder:
    """A continuously refilled pool of at most max_rows sequences."""

    def __init__(self, model, tokenizer, sampling: Sampling, max_rows: int = 128, prefill_tokens: int = 32768,
                 reuse_prefix_kv: bool = True):
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
        self.rows: list = []          # the pool's B slots: a _Row, or None where a row has finished
        self.cache = None             # the pool's KV cache, (B, heads, T, head_dim) per layer
        self.mask = None              # (B, T) 1 where the cache holds a real token (a free slot: 0)
        self.last = None              # (B,) sampled token not yet fed
        self.pos = None               # (B,) its position id
        self.reuse_prefix_kv = reuse_prefix_kv
        self.kept: dict = {}          # key -> (parent key, start, its tokens, per layer (K, V) of tokens start:)
        self.prefilled_tokens = self.reused_tokens = 0

    def submit(self, key, prefix: list[int], max_new: int, priority: int = 0, reuse=None, keep: bool = False) -> None:
        """Queue a request; higher priority joins the pool first, ties in order.
        keep: hold this request's KV cache once it finishes, under `key` (unique
        among kept requests), until release(). reuse: the key of a kept request
        whose tokens start with `prefix`: its cache is copied instead of
        prefilling the prefix again."""
        if max_new < 1:
            raise ValueError(f"max_new must be >= 1, got {max_new}")
        if not self.reuse_prefix_kv:
            reuse, keep = None, False
        heapq.heappush(self.queue, (-priority, next(self.order), key, list(prefix), max_new, reuse, keep))

    def release(self, keys) -> None:
        """Free the kept caches of these requests (those of one finished tree)."""
        for key in keys:
            self.kept.pop(key, None)

    def busy(self) -> bool:
        return bool(self.queue or self.rows)

    @torch.no_grad()
    def step(self) -> list[tuple]:
        """Admit waiting requests, decode one token for every row; return the
        rows that finished as (key, new_ids, logps)."""
        free = self.max_rows - sum(r is not None for r in self.rows)
        # A prefill is a forward of its own: wait for a few free slots unless
        # the pool is running dry or the queue is short.
        if self.queue and free and (free >= min(len(self.queue), max(1, self.max_rows // 8))
                                    or self.max_rows - free < self.max_rows // 2):
            self._admit([heapq.heappop(self.queue)[2:] for _ in range(min(free, len(self.queue)))])
        done = self._retire()  # a prefilled row can end at its first token
        if not self.rows:
            return done
        if 8 * sum(r is None for r in self.rows) > len(self.rows):
            self._pack([])  # free slots still compute: past 1/8 of the pool, one copy to drop them
        first = int(self.mask.any(0).nonzero()[0])  # leading columns that are padding in every row
        if first:
            self._window(first, len(self.rows))
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)  # (B, T + 1)
        out = self.model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                         cache=self.cache, use_cache=True)  # the cache grows in place
        self.last, logp = sample(out.logits[:, -1], self.vocab, self.sampling)
        self._take(self.last, logp, self.rows)
        self.pos = self.pos + 1
        return done + self._retire()

    def _take(self, tok: torch.Tensor, logp: torch.Tensor, rows: list) -> None:
        """Append each row's sampled token; it is fed at the next step."""
        for row, t, lp in zip(rows, tok.tolist(), logp.tolist()):
            if row is not None:  # a free slot decodes too; what it samples is dropped
                row.ids.append(t)
                row.logps.append(lp)

    def _admit(self, requests: list[tuple]) -> None:
        """Join new requests to the pool. A request whose prefix a kept row
        holds copies that row's cache and feeds its last prefix token at the
        next step; the others are prefilled in left-padded batches. Newcomers
        are written into free slots; only when they do not fit (more rows or
        longer prefixes than the pool has room for) is the pool packed again."""
        warm, cold = [], []
        for key, prefix, budget, reuse, keep in requests:
            kv = self._kept_prefix(reuse, prefix) if reuse is not None and len(prefix) > 1 else None
            row = _Row(key, budget, keep, seq=prefix)
            if kv:
                row.parent, row.start = reuse, len(prefix) - 1
            (warm if kv else cold).append((row, kv))
        # blocks of rows to join: (per layer (K, V), mask (n, W), position (n,), token to feed (n,), rows)
        blocks, chunks, tokens = [], [], self.prefill_tokens
        for row, _ in cold:  # prefills of at most prefill_tokens prefix tokens (one request always fits)
            if tokens + len(row.seq) > self.prefill_tokens:
                chunks.append([])
                tokens = 0
            chunks[-1].append(row)
            tokens += len(row.seq)
        for chunk in chunks:
            ids, mask = left_pad([row.seq for row in chunk], self.pad)
            ids, mask = ids.to(self.device), mask.to(self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)                    # (n, W)
            cache = DynamicCache()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                             logits_to_keep=1)
            tok, logp = sample(out.logits[:, -1], self.vocab, self.sampling)
            self._take(tok, logp, chunk)
            blocks.append(([(layer.keys, layer.values) for layer in cache.layers], mask, pos[:, -1] + 1, tok, chunk))
            self.prefilled_tokens += int(mask.sum())
        for row, kv in warm:
            n = row.start
            blocks.append((kv, torch.ones(1, n, dtype=torch.long, device=self.device),
                           torch.tensor([n], device=self.device), torch.tensor([row.seq[-1]], device=self.device),
                           [row]))
            self.reused_tokens += n
        if not self.rows:
            return self._pack(blocks)
        B, T = self.mask.shape
        free = [i for i, r in enumerate(self.rows) if r is None]
        n = sum(len(rows) for *_, rows in blocks)
        wider = max(m.shape[1] for _, m, *_ in blocks) - T  # columns the view must gain on the left
        if n > len(free) + self.cache.layers[0].kbuf.shape[0] - B or wider > self.cache.layers[0].lo:
            return self._pack(blocks)  # no room: one copy of the pool
        slots = free[:n] + list(range(B, B + n - len(free[:n])))
        grow = max(slots) + 1 - B  # new slots at the end of the pool
        if grow > 0:
            self.rows += [None] * grow
            self.mask = F.pad(self.mask, (0, 0, 0, grow))
            self.pos, self.last = F.pad(self.pos, (0, grow)), F.pad(self.last, (0, grow))
        self._window(-max(wider, 0), len(self.rows))
        T = self.mask.shape[1]
        for kv, mask, pos, last, rows in blocks:
            at, slots = torch.tensor(slots[:len(rows)], device=self.device), slots[len(rows):]
            for i, layer in enumerate(self.cache.layers):
                layer.write(at, *kv[i])
            self.mask[at] = F.pad(mask, (T - mask.shape[1], 0))
            self.pos[at], self.last[at] = pos, last
            for j, row in zip(at.tolist(), rows):
                self.rows[j] = row

    def _window(self, first: int, B: int) -> None:
        """Move the left edge of the cache view by `first` columns (no copy);
        the view spans slots :B."""
        for layer in self.cache.layers:
            layer.window(first, B)
        self.mask = self.mask[:, first:] if first >= 0 else F.pad(self.mask, (-first, 0))

    def _pack(self, blocks: list[tuple]) -> None:
        """New buffers holding the pool's rows, then `blocks`, on the batch axis
        (one copy of the pool), with room for as many rows again (up to
        max_rows), without free slots and without the left columns that are
        padding in every row."""
        blocks = self._pool_blocks() + blocks
        T = max(mask.shape[1] for _, mask, _, _, _ in blocks)
        B = sum(len(rows) for *_, rows in blocks)
        if self.cache is None:
            self.cache = Cache(layers=[_Layer() for _ in blocks[0][0]])
        for i, layer in enumerate(self.cache.layers):
            layer.place([kv[i] for kv, *_ in blocks], T, min(self.max_rows, 2 * B))
        self.mask = torch.cat([F.pad(mask, (T - mask.shape[1], 0)) for _, mask, _, _, _ in blocks])
        self.pos = torch.cat([pos for _, _, pos, _, _ in blocks])
        self.last = torch.cat([last for _, _, _, last, _ in blocks])
        self.rows = [row for *_, rows in blocks for row in rows]

    def _kept_prefix(self, key, prefix: list[int]):
        """Per layer (K, V), (1, heads, len(prefix) - 1, head_dim): the cache of
        prefix[:-1] from kept request `key` and the requests it copied from, or
        None if one of them was released."""
        L = len(prefix) - 1
        if key not in self.kept:
            return None
        if self.kept[key][2][:L] != prefix[:L]:
            raise ValueError(f"reuse={key!r}: that request's tokens do not start with this prefix")
        pieces = []  # each request's own columns that the prefix covers, the last one first
        while L > 0:
            if key not in self.kept:
                return None
            key, start, _, own = self.kept[key]  # key becomes the request it copied its first `start` from
            if start < L:
                pieces.append([(k[:, :, :L - start], v[:, :, :L - start]) for k, v in own])
                L = start
        if len(pieces) == 1:
            return pieces[0]
        return [(torch.cat([p[i][0] for p in reversed(pieces)], 2), torch.cat([p[i][1] for p in reversed(pieces)], 2))
                for i in range(len(pieces[0]))]

    def _pool_blocks(self) -> list[tuple]:
        """The pool's rows as blocks for _pack, one per run of consecutive slots
        (views, copied once by place()), without the leading columns that are
        padding in every one of them."""
        live = [i for i, r in enumerate(self.rows) if r is not None]
        if not live:
            return []
        first = int(self.mask[live].any(0).nonzero()[0])
        runs, start = [], live[0]
        for i, nxt in zip(live, live[1:] + [None]):
            if nxt != i + 1:
                runs.append((start, i + 1))
                start = nxt
        return [([(layer.keys[a:b, :, first:], layer.values[a:b, :, first:]) for layer in self.cache.layers],
                 self.mask[a:b, first:], self.pos[a:b], self.last[a:b], self.rows[a:b]) for a, b in runs]

    def _retire(self) -> list[tuple]:
        """Hand back the rows that just finished; their slots become free (mask 0)."""
        finished = [r is not None and bool(r.ids) and (r.ids[-1] == self.eos or len(r.ids) >= r.budget)
                    for r in self.rows]
        if not any(finished):
            return []
        for i, (r, f) in enumerate(zip(self.rows, finished)):
            if f and r.keep:  # its own columns: the last (tokens fed - start) of the row
                own = int(self.mask[i].sum()) - r.start
                self.kept[r.key] = (r.parent, r.start, r.seq + r.ids[:-1],
                                    [(layer.keys[i:i + 1, :, -own:].clone(), layer.values[i:i + 1, :, -own:].clone())
                                     for layer in self.cache.layers])
        done = [(r.key, r.ids, r.logps) for r, f in zip(self.rows, finished) if f]
        self.rows = [None if f else r for r, f in zip(self.rows, finished)]
        if all(r is None for r in self.rows):
            self.rows, self.cache, self.mask, self.last, self.pos = [], None, None, None, None
        else:
            self.mask[torch.tensor([i for i, f in enumerate(finished) if f], device=self.device)] = 0
        return done
