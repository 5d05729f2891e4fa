"""IB-TPO: step advantages on the tree, token log-probs, and the clipped loss.

Notation as in METHOD.md (sections 5 and 6). For a step node s with parent s_p
in the tree of one question:

  Eq. GL     A_GL(s) = (V(s) - V(root)) / std(leaf rewards of the tree)
  Eq. LOCAL  A_IB(s) = eta1(s) * eta2(s)
                     = (V(s) / V(s_p) - (1 + 1/beta)) * pi_old(s)
  Eq. ADV    A(s)    = A_GL(s) + lam * A_IB(s)

and every response token of step s gets A(s). With independent chains (every
leaf a child of the root, or a chain of single-child steps) V(s) = R on every
step, so lam = 0 gives exactly GRPO's (R - mean) / std.

  Eq. LOSS   w_t = exp(logp_theta(t) - logp_old(t))
             l_t = -min(w_t A_t, clip(w_t, 1 - eps_low, 1 + eps_high) A_t)
                   + kl_coef * k3_t,   k3_t = exp(ref - logp) - (ref - logp) - 1

DECISIONs taken here (where the paper is silent; METHOD.md section 7):
- std is the population std (GL_STD_UNBIASED = False). GRPO codebases differ:
  several call torch's default std, which is the sample std; set the flag to
  True for that.
- std = 0 (all leaf rewards equal, or a single leaf): A_GL = 0 on every node.
- ratio guard: V(s)/V(s_p) := 1 when V(s_p) = 0. Note that A_IB is then
  -pi_old(s)/beta, so an all-wrong (or all-right) tree still gets a small
  negative push of -lam * pi_old / beta on each step: that is Eq. LOCAL as
  written, not a bug.
- pi_old(s) is tree.step_prob(s, step_prob_mode) ("mean" by default): the
  rollout policy's step probability, a constant.
- shared prefixes: no down-weighting by default; sqrt_leaves=True divides
  A(s) by sqrt(number of leaves below s), as TreeRL does.
- loss aggregation: "token-mean" (default), "seq-mean-token-mean" (original
  GRPO), "constant" (Dr. GRPO), always normalised over the whole optimizer step
  (see loss_normalizer), so the loss does not depend on the micro-batch split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tree import Node, Tree, step_prob

GL_STD_UNBIASED = False  # population std for Eq. GL (GRPO's); True = sample std
AGG_MODES = ("token-mean", "seq-mean-token-mean", "constant")


# --------------------------------------------------------------------------
# Trajectories: the loss's view of a tree
# --------------------------------------------------------------------------

@dataclass
class Trajectory:
    """One root-to-leaf path, ready for the loss."""
    prompt_ids: list[int]
    response_ids: list[int]             # (T,) generated ids, root to leaf
    old_logps: list[float]              # (T,) rollout log-probs of response_ids
    step_index: list[int]               # (T,) index into `steps` of each response token
    steps: list[Node]                   # the step nodes on the path, root's child first
    reward: float
    tree: Tree


def trajectories(tree: Tree) -> list[Trajectory]:
    """One Trajectory per leaf of `tree`."""
    out = []
    for leaf in tree.leaves():
        steps = leaf.path()
        ids, logps, index = [], [], []
        for i, s in enumerate(steps):
            ids += s.ids
            logps += s.logps
            index += [i] * len(s.ids)
        out.append(Trajectory(tree.prompt_ids, ids, logps, index, steps, float(leaf.reward or 0.0), tree))
    return out


# --------------------------------------------------------------------------
# Advantages (Eq. GL, Eq. LOCAL, Eq. ADV)
# --------------------------------------------------------------------------

def compute_advantages(tree: Tree, beta: float, lam: float, step_prob_mode: str = "mean",
                       sqrt_leaves: bool = False) -> None:
    """Set node.A_GL, node.A_IB and node.A on every non-root node of `tree`.

    Recomputes V first (tree.update_values), so the leaves' rewards must be set.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    leaves = tree.leaves()
    if any(leaf.reward is None for leaf in leaves):
        raise ValueError("every leaf needs a reward before compute_advantages")
    tree.update_values()
    root = tree.root
    root.A_GL = root.A_IB = root.A = 0.0
    if not leaves:
        return

    rewards = torch.tensor([float(leaf.reward) for leaf in leaves], dtype=torch.float64)
    # all equal -> std = 0 exactly (rounding in the mean could leave ~1e-17)
    all_equal = bool((rewards == rewards[0]).all())
    std = 0.0 if all_equal else rewards.std(unbiased=GL_STD_UNBIASED).item()
    counts = tree.leaf_counts() if sqrt_leaves else None

    for s in tree.nodes()[1:]:
        s_p = s.parent
        s.A_GL = (s.V - root.V) / std if std > 0 else 0.0                        # Eq. GL
        r = s.V / s_p.V if s_p.V != 0 else 1.0                                  # ratio guard
        eta1, eta2 = r - (1.0 + 1.0 / beta), step_prob(s, step_prob_mode)
        s.A_IB = eta1 * eta2                                                    # Eq. LOCAL
        s.A = s.A_GL + lam * s.A_IB                                             # Eq. ADV
        if sqrt_leaves:
            s.A /= math.sqrt(max(counts[s], 1))


def token_advantages(traj: Trajectory) -> list[float]:
    """A of the step each response token belongs to, (T,) like traj.response_ids."""
    return [traj.steps[i].A for i in traj.step_index]


# --------------------------------------------------------------------------
# Batches: trajectories as padded tensors, packed by a token budget
# --------------------------------------------------------------------------

def micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Pack sequences, longest first, so that rows x longest row <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


def collate(trajs: list[Trajectory], pad: int, device):
    """Right-padded (B, T) ids and mask, and (B, T-1) tensors aligned to the
    next-token log-probs: the response mask and the advantages."""
    T = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    ids = torch.full((len(trajs), T), pad, dtype=torch.long)
    attn = torch.zeros((len(trajs), T), dtype=torch.long)
    resp = torch.zeros((len(trajs), T - 1))
    adv = torch.zeros((len(trajs), T - 1))
    for i, t in enumerate(trajs):
        P, R = len(t.prompt_ids), len(t.response_ids)
        ids[i, :P + R] = torch.tensor(t.prompt_ids + t.response_ids)
        attn[i, :P + R] = 1
        resp[i, P - 1:P + R - 1] = 1  # logp[:, t] scores ids[:, t + 1]
        adv[i, P - 1:P + R - 1] = torch.tensor(token_advantages(t))
    return ids.to(device), attn.to(device), resp.to(device), adv.to(device)


# --------------------------------------------------------------------------
# Token log-probs
# --------------------------------------------------------------------------

def _logp_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    x = logits.float() / temperature                    # (n, V) float32, one chunk only
    lsm = F.log_softmax(x, dim=-1)                      # (n, V)
    logp = lsm.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    entropy = -(lsm.exp() * lsm).sum(-1)                # (n,)
    return logp, entropy


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, chunk_rows: int = 1024,
                   position_ids: torch.Tensor | None = None,
                   vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token and the entropy of the next-token distribution.

    Returns (logp, entropy), both (B, T-1) float32, aligned to input_ids[:, 1:]:
    logp[:, t] = log p(input_ids[:, t+1] | input_ids[:, :t+1]) with the logits
    divided by `temperature` (the rollout's, so that logp matches old_logps).
    Values at padding positions are meaningless; mask them. vocab_size keeps
    only the tokenizer's ids, as the rollout does (Qwen pads its embedding
    matrix past the vocabulary; those rows are never sampled).
    """
    B, T = input_ids.shape
    if position_ids is None:
        # transformers' Llama defaults to arange(T) and ignores the mask here;
        # left-padded rows must count from 0 at their first real token, as
        # generate() does (RoPE hides a constant offset only up to rounding).
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    # The ordinary call, so an FSDP2 root's pre-forward hook runs.
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False).logits     # (B, T, V) model dtype
    flat = logits.reshape(B * T, logits.shape[-1])                          # (B*T, V) view
    # Next token of each position; the last column gets a dummy target and is dropped.
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(-1)  # (B*T,)

    # Chunks of rows keep one float32 (chunk, V) block alive at a time. Under
    # autograd each chunk is checkpointed: backward recomputes its log-softmax
    # instead of saving B*T float32 rows of it.
    logps, ents = [], []
    for i in range(0, B * T, chunk_rows):
        args = (flat[i:i + chunk_rows, :vocab_size], targets[i:i + chunk_rows], temperature)
        if torch.is_grad_enabled() and flat.requires_grad:
            lp, en = checkpoint(_logp_entropy, *args, use_reentrant=False)
        else:
            lp, en = _logp_entropy(*args)
        logps.append(lp)
        ents.append(en)
    logp = torch.cat(logps).view(B, T)[:, :-1]        # (B, T-1)
    entropy = torch.cat(ents).view(B, T)[:, :-1]      # (B, T-1)
    return logp, entropy


# --------------------------------------------------------------------------
# Loss (Eq. LOSS)
# --------------------------------------------------------------------------

def loss_normalizer(masks, agg: str = "token-mean", max_tokens: int | None = None) -> float:
    """This rank's share of the step normalizer, from the masks of ALL its micro-batches.

    token-mean:           number of response tokens
    seq-mean-token-mean:  number of sequences (rows with >= 1 response token)
    constant:             number of sequences * max_tokens (Dr. GRPO)

    Under data parallelism sum it over ranks before use, e.g.
        t = torch.tensor(n, device=dev); dist.all_reduce(t); n = t.item()
    so that every rank divides by the count of the whole optimizer step.
    `masks` is an iterable of (B_i, T_i) masks (1 on response tokens).
    """
    _check_agg(agg)
    masks = [m.bool() for m in masks]
    if agg == "token-mean":
        return float(sum(int(m.sum()) for m in masks))
    n_seq = sum(int(m.any(-1).sum()) for m in masks)
    if agg == "seq-mean-token-mean":
        return float(n_seq)
    if max_tokens is None or max_tokens <= 0:
        raise ValueError("agg='constant' needs max_tokens > 0")
    return float(n_seq * max_tokens)


def _check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                normalizer: float, *, eps_low: float = 0.2, eps_high: float = 0.2,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                agg: str = "token-mean", world_size: int = 1) -> tuple[torch.Tensor, dict]:
    """Eq. LOSS for one micro-batch: world_size * sum_t weight_t * l_t / normalizer.

    All tensors (B, T) float32 and aligned; adv may be (B, 1) (one per sequence);
    mask is 1 on response tokens. `normalizer` is loss_normalizer(...) of the
    whole optimizer step, all micro-batches and all ranks (its docstring). The
    per-token weight is 1/(response tokens of the row) for seq-mean-token-mean,
    else 1. Summing the returned losses over micro-batches (backward on each)
    gives the same gradient however the step is split.

    world_size: FSDP/DDP *average* gradients over ranks, so the gradient each
    rank contributes is divided by world_size. Multiplying each rank's loss by
    world_size turns that average back into the plain sum over ranks, i.e. the
    gradient of (sum over the whole step) / normalizer.

    Stats are detached sums (all-reduce them, then divide by "tokens"):
    tokens, clipped (clipped branch active: A>0 and w>1+eps_high, or A<0 and
    w<1-eps_low), clipped_high, clipped_low, ratio, kl (when ref_logp given),
    and loss_sum (the unweighted sum of l_t).
    """
    _check_agg(agg)
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    m = mask.bool()                                                     # (B, T)
    adv = adv.expand_as(logp)                                           # (B, T)
    # Zero the log-ratios off the mask: padding logps can be anything, and an
    # inf ratio there would turn into NaN gradients even behind torch.where.
    log_w = torch.where(m, logp - old_logp, torch.zeros_like(logp))     # (B, T)
    w = torch.exp(log_w)
    w_clip = w.clamp(1.0 - eps_low, 1.0 + eps_high)
    l = -torch.min(w * adv, w_clip * adv)                               # (B, T)
    k3 = None
    if ref_logp is not None:
        d = torch.where(m, ref_logp - logp, torch.zeros_like(logp))      # (B, T)
        k3 = torch.exp(d) - d - 1.0                                     # >= 0, 0 iff equal
        if kl_coef > 0:
            l = l + kl_coef * k3

    mf = m.to(l.dtype)
    if agg == "seq-mean-token-mean":
        weight = mf / mf.sum(-1, keepdim=True).clamp(min=1.0)           # (B, T) 1/n_i
    else:
        weight = mf
    loss = world_size * (l * weight).sum() / normalizer

    with torch.no_grad():
        high = m & (adv > 0) & (w > 1.0 + eps_high)
        low = m & (adv < 0) & (w < 1.0 - eps_low)
        stats = {
            "tokens": mf.sum(),
            "clipped": (high | low).sum().float(),
            "clipped_high": high.sum().float(),
            "clipped_low": low.sum().float(),
            "ratio": (w * mf).sum(),
            "loss_sum": (l * mf).sum(),
        }
        if k3 is not None:
            stats["kl"] = (k3 * mf).sum()
    return loss, {k: v.detach() for k, v in stats.items()}
