"""IB-TPO training loop: plain PyTorch, one process per GPU, FSDP2.

    python train.py configs/toy.yaml                          # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 train.py configs/qwen3_1p7b_ibtpo.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$HEAD:29500 train.py configs/qwen3_8b_ibtpo.yaml
    python train.py cfg.yaml eval_only=true model=runs/x/checkpoints/step_000100/hf

Every step (METHOD.md sections 4-6):
  1. rollout: each rank grows IBTrees (B0, L, K, B) for its share of the
     questions (tree.grow on engine.Decoder, a continuous-batching decode loop,
     or engine.Lockstep, one batched generate per round), verified by reward.py;
  2. advantages: A = A_GL + lam * A_IB per step node (ibtpo.compute_advantages);
  3. update: the clipped surrogate with k3 KL (Eq. LOSS) over every root-to-leaf
     trajectory, micro-batched by a token budget, normalised over the whole
     optimizer step across micro-batches and ranks.

Simplifications against the paper (which used verl + vLLM on 8 x A100):
  - Rollouts run on the training weights, gathered once per rollout phase, with
    engine.Decoder (continuous batching over one KV cache; branches copy their
    prefix's cache from the request that generated it; no paged attention) or
    HF generate: no separate inference engine like vLLM.
  - The ratio's old log-probs (Eq. LOSS) are recomputed by the training
    model, not taken from the rollout (whose kernels and cached decoding differ
    by rounding). With updates_per_batch = 1 (default) they are the detached
    log-probs of the training forward itself: the ratio is 1 and only the
    advantage acts, as in on-policy GRPO, at no extra cost. With more updates
    per batch, one no-grad forward over every trajectory before the first
    optimizer step records the sampling policy's log-probs, so the later
    mini-batches get their importance ratio and clip; it costs one extra
    forward pass (about a third of a training pass).
  - pi_old(s) in A_IB and eta2 in the IB-Score use the rollout's log-probs
    (temperature-scaled, before top-k/top-p truncation).
  - Each trajectory is a sample of its own: tokens of a shared prefix appear in
    every trajectory through them, with no down-weighting (sqrt_leaves: false; METHOD.md section 7).
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line first: usage, or a mistake in it, before torch loads (20-40 s)
    import config
    try:
        config.from_command_line(sys.argv[1:])
    except config.UserError as e:
        config.exit_with(e)

import contextlib
import functools
import json
import math
import os
import random
import time

import torch
import torch.distributed as dist

import checkpoint
import engine
import ibtpo
import plots
import reward
import tree
from config import Config, UserError, exit_with, explained, from_command_line, save_config
from data import batch_indices, describe, load_eval_sets, load_questions


# ----------------------------------------------------------------------------
# Distributed set-up: always a process group (gloo world of 1 without torchrun)

def setup_distributed() -> tuple[int, int, torch.device]:
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python train.py`: a world of one
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: int, device) -> int:
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ----------------------------------------------------------------------------
# Model

def load_model(path: str, cfg: Config, device, trainable: bool):
    """from_pretrained in float32 (the master weights), then FSDP2 with the
    compute dtype as param_dtype: each decoder layer is its own shard unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if trainable else getattr(torch, cfg.dtype))
    model.to(device)
    if trainable and cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.dtype), reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if not trainable:
        model.requires_grad_(False)
    return model.train(trainable)


@contextlib.contextmanager
def gathered(model):
    """Keep every FSDP unit unsharded for a whole rollout: one all-gather per
    unit per phase instead of one per decoded token (and no collectives while
    ranks decode different numbers of tokens). Costs the full compute-dtype
    weights on every GPU: 2 bytes x parameters."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    model.set_reshard_after_forward(False)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        for m in units:
            m.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root's default


# ----------------------------------------------------------------------------
# Rollout, update

def tree_config(cfg: Config) -> tree.TreeConfig:
    return tree.TreeConfig(B0=cfg.B0, L=cfg.L, K=cfg.K, B=cfg.B, strategy=cfg.strategy,
                           beta=cfg.beta, step_prob=cfg.step_prob, max_step_tokens=cfg.max_step_tokens)


def make_engine(model, tok, sampling: tree.Sampling, cfg: Config):
    """The rollout engine tree.grow() drives (config key rollout_engine)."""
    if cfg.rollout_engine == "decoder":
        return engine.Decoder(model, tok, sampling, cfg.max_rows, reuse_prefix_kv=cfg.reuse_prefix_kv)
    return engine.Lockstep(functools.partial(tree.generate_expander, model, tok, sampling))


def update(model, ref, optimizer, scheduler, trajs, cfg: Config, tok, world: int, device) -> tuple[dict, list]:
    """updates_per_batch optimizer steps over this rank's trajectories, one per
    mini-batch (trajs[i::updates_per_batch]), each micro-batched by token budget.
    An update whose loss or gradient norm is not finite on any rank is skipped on
    every rank (no weight moves; the LR schedule still advances). Returns the
    batch's statistics and, per update, whether it was skipped."""
    stats = {"tokens": 0.0, "clipped": 0.0, "kl": 0.0, "entropy": 0.0, "loss_sum": 0.0, "pad": 0.0, "cells": 0.0}
    grad_norms, lrs, skips = [], [], []
    plans = []  # per mini-batch: (normalizer, collated micro-batches, dummy flags)
    for i in range(cfg.updates_per_batch):
        group = trajs[i::cfg.updates_per_batch]
        mbs = ibtpo.micro_batches([len(t.prompt_ids) + len(t.response_ids) for t in group], cfg.micro_batch_tokens)
        n_tokens, n_seq = sum(len(t.response_ids) for t in group), len(group)
        norm = {"token-mean": n_tokens, "seq-mean-token-mean": n_seq,
                "constant": n_seq * cfg.max_response_tokens}[cfg.loss_agg]
        # the normalizer of the whole optimizer step, and an equal number of
        # forward/backward passes on every rank (FSDP collectives must match);
        # a rank that ran out makes zero-weight passes
        norm = all_sum([norm], device)[0]
        n_mb = all_max(len(mbs), device)
        dummy = [j >= len(mbs) for j in range(n_mb)]
        batches = [ibtpo.collate([group[0]] if d else [group[k] for k in mbs[j]], tok.pad_token_id, device)
                   for j, d in enumerate(dummy)]
        plans.append((max(norm, 1.0), batches, dummy))
    olds = None
    if cfg.updates_per_batch > 1:
        # logp_old of Eq. LOSS is the policy that sampled the batch. Mini-batch 2 on
        # comes after an optimizer step, so record it for all of them first: one
        # no-grad forward over every trajectory (about a third of a training pass).
        with torch.no_grad():
            olds = [[ibtpo.token_logprobs(model, ids, attn, temperature=cfg.temperature, vocab_size=len(tok))[0]
                     for ids, attn, _, _ in batches] for _, batches, _ in plans]
    for i, (norm, batches, dummy) in enumerate(plans):
        finite = True
        for j, ((ids, attn, resp, adv), d) in enumerate(zip(batches, dummy)):
            logp, ent = ibtpo.token_logprobs(model, ids, attn, temperature=cfg.temperature, vocab_size=len(tok))
            ref_logp = None
            if ref is not None:
                with torch.no_grad():
                    ref_logp, _ = ibtpo.token_logprobs(ref, ids, attn, temperature=cfg.temperature,
                                                       vocab_size=len(tok))
            old = logp.detach() if olds is None else olds[i][j]  # one update: on-policy, ratio 1
            loss, s = ibtpo.policy_loss(logp, old, adv, resp, norm, eps_low=cfg.eps_low,
                                        eps_high=cfg.eps_high, ref_logp=ref_logp, kl_coef=cfg.kl_coef,
                                        agg=cfg.loss_agg, world_size=world)
            (loss * (0.0 if d else 1.0)).backward()
            finite = finite and bool(torch.isfinite(loss))
            if not d:
                for k in ("tokens", "clipped", "loss_sum"):
                    stats[k] += float(s[k])
                stats["kl"] += float(s.get("kl", 0.0))
                stats["entropy"] += float((ent.detach() * resp).sum())
                stats["cells"] += float(attn.numel())
                stats["pad"] += float(attn.numel() - attn.sum())
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)  # the norm over all ranks
        skips.append(not checkpoint.agree(finite and math.isfinite(gn)))
        if not skips[-1]:
            grad_norms.append(gn)
            lrs.append(scheduler.get_last_lr()[0])  # the rate this optimizer step uses
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    tot = dict(zip(stats, all_sum(list(stats.values()), device)))
    n = max(tot["tokens"], 1.0)
    return {"loss": tot["loss_sum"] / n, "kl": tot["kl"] / n, "clip_frac": tot["clipped"] / n,
            "entropy": tot["entropy"] / n, "pad_frac": tot["pad"] / max(tot["cells"], 1.0),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "train_tokens": tot["tokens"], "lr": lrs[-1] if lrs else 0.0, "skipped_steps": sum(skips)}, skips


def batch_metrics(trees, verdicts: dict, tcfg: tree.TreeConfig, world: int, device) -> dict:
    """The rollout's statistics over all ranks (METHOD.md section 8): per-rank means
    over equal question counts averaged, counts summed."""
    s = tree.tree_stats(trees, tcfg)
    keys = ["avg_rate", "eff_rate", "ib_score", "ib_exploration", "ib_exploitation", "cov_eta"]
    summed = all_sum([s[k] for k in keys] + [s["gen_tokens"], s["trajectories"], verdicts.get("unparsed", 0),
                                             verdicts.get("timeout", 0), verdicts.get("error", 0)], device)
    row = {k: v / world for k, v in zip(keys, summed)}
    row.update(reward_mean=row["avg_rate"], gen_tokens=int(summed[6]), trajectories=int(summed[7]),
               traj_per_1k_tokens=1000 * summed[7] / max(summed[6], 1), unparsed=int(summed[8]),
               verifier_timeouts=int(summed[9]), verifier_errors=int(summed[10]))
    if device.type == "cuda":
        row["peak_mem_gb"] = all_max(torch.cuda.max_memory_allocated(device), device) / 2**30
    return row


# ----------------------------------------------------------------------------
# Evaluation: avg@k with the training verifier

def evaluate(model, tok, sets: dict, cfg: Config, rank: int, world: int, device) -> dict:
    """avg@k accuracy per eval set: k samples per question, mean reward."""
    sampling = tree.Sampling(cfg.eval_temperature, cfg.eval_top_p, cfg.top_k, cfg.max_response_tokens)
    rollout = make_engine(model, tok, sampling, cfg)
    out = {}
    with gathered(model):
        for name, (prompts, answers) in sets.items():
            jobs = [i for i in range(rank, len(prompts), world) for _ in range(cfg.eval_k)]
            # Lockstep sends each chunk to one generate call; the Decoder bounds its own pool
            size = max(cfg.questions_per_step // world * cfg.B0, cfg.eval_k)
            size = size if cfg.rollout_engine == "lockstep" else max(len(jobs), 1)
            correct = 0.0
            for c in range(0, len(jobs), size):
                for j in jobs[c:c + size]:
                    rollout.submit(j, prompts[j], cfg.max_response_tokens)
                done = []
                while rollout.busy():
                    done += rollout.step()
                texts = tok.batch_decode([ids for _, ids, _ in done], skip_special_tokens=True)
                rewards, _ = reward.score_batch(texts, [answers[j] for j, _, _ in done], cfg.verifier_timeout)
                correct += sum(rewards)
            total, n = all_sum([correct, len(jobs)], device)
            out[f"eval/{name}"] = total / max(n, 1)
    return out


# ----------------------------------------------------------------------------
# The loop

MAX_SKIPPED_IN_A_ROW = 3  # optimizer updates with a non-finite loss or gradient before the run stops


def main(argv: list[str] | None = None) -> dict:
    cfg = from_command_line(sys.argv[1:] if argv is None else argv)
    rank, world, device = setup_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    if cfg.questions_per_step % world:
        raise UserError(f"config: questions_per_step ({cfg.questions_per_step}) must be a multiple "
                        f"of the number of processes ({world})")
    if cfg.updates_per_batch > cfg.questions_per_step // world * tree_config(cfg).G:
        raise UserError(f"config: updates_per_batch ({cfg.updates_per_batch}) is more than the trajectories "
                        f"of one rank's questions ({cfg.questions_per_step // world} x G = "
                        f"{cfg.questions_per_step // world * tree_config(cfg).G})")
    if cfg.eval_only and not cfg.eval_sets:
        raise UserError("config: eval_only=true needs eval_sets (nothing to evaluate)")
    if not cfg.eval_only:
        step, ckpt, note = checkpoint.start(cfg)  # before anything is written to run_dir
        checkpoint.check_writable(cfg.run_dir, rank)
    from tqdm import tqdm
    from transformers import AutoTokenizer
    if cfg.threads:  # a tiny model gains little from a second thread and can be 4-11x slower on a busy machine
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + 1000 * rank)  # the rollouts' sampling RNG, one stream per rank
    random.seed(cfg.seed + 1000 * rank)         # the branching strategies' RNG
    tok = explained("model", cfg.model, AutoTokenizer.from_pretrained)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = explained("model", cfg.model, lambda p: load_model(p, cfg, device, trainable=not cfg.eval_only))
    eval_sets, reports = load_eval_sets(tok, cfg)
    for name, report in reports.items():
        say(describe(f"eval set {name}", report, cfg))

    if cfg.eval_only:  # its own files: never the training run's config.yaml or metrics
        res = evaluate(model, tok, eval_sets, cfg, rank, world, device)
        if rank == 0:
            print(json.dumps(res))
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "eval.json"), "w") as f:
                json.dump(res, f)
            save_config(cfg, os.path.join(cfg.run_dir, "eval_config.yaml"))
        return res

    prompts, answers, report = load_questions(cfg.data, tok, cfg, cfg.data_subset, cfg.data_split,
                                              (cfg.question_field, cfg.answer_field))
    say(describe(f"training data {cfg.data}", report, cfg))
    total = cfg.steps or len(prompts) // cfg.questions_per_step
    if total == 0:
        raise UserError(f"nothing to train: steps=0 means one epoch, and the {len(prompts)} questions of "
                        f"{cfg.data} are fewer than questions_per_step={cfg.questions_per_step}")
    say(f"{note}: steps {step + 1}-{total} of {cfg.questions_per_step} questions, (B0, L, K, B) = "
        f"({cfg.B0}, {cfg.L}, {cfg.K}, {cfg.B}), {world} process(es)" if step < total else
        f"{note}: already at step {step} of steps={total}, nothing to train")
    ref = load_model(cfg.model, cfg, device, trainable=False) if cfg.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warm)
    if ckpt:
        step = checkpoint.load_checkpoint(model, optimizer, ckpt, rank)
    for _ in range(step * cfg.updates_per_batch):
        scheduler.step()  # the schedule is a function of the step alone
    metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    history = checkpoint.read_metrics(metrics_path)  # parsed on every rank: a bad file fails them all
    if rank == 0:  # set up to train: the config, and the metrics the restored state has seen
        config_path = os.path.join(cfg.run_dir, "config.yaml")
        if ckpt and cfg.resume == "force" and os.path.isfile(config_path):
            os.replace(config_path, os.path.join(cfg.run_dir, f"config.until_step_{step:06d}.yaml"))
        save_config(cfg, config_path)
        checkpoint.write_metrics(metrics_path, [r for r in history if r["step"] <= step])
    tcfg = tree_config(cfg)
    sampling = tree.Sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_response_tokens)
    rollout_engine = make_engine(model, tok, sampling, cfg)
    verify = functools.partial(reward.score_batch, timeout=cfg.verifier_timeout)
    log = (lambda row: checkpoint.append_metrics(metrics_path, row)) if rank == 0 else (lambda row: None)

    if eval_sets and step == 0:
        log({"step": 0, **evaluate(model, tok, eval_sets, cfg, rank, world, device)})
    bar = tqdm(range(step, total), initial=step, total=total, disable=rank != 0, desc="ib-tpo")
    last, skipped_in_a_row = {}, 0
    with checkpoint.Stop() as stop:
        for step in bar:
            t0 = time.time()
            idx = batch_indices(step, len(prompts), cfg, rank, world)
            try:
                with gathered(model):
                    trees, verdicts = tree.grow([prompts[i] for i in idx], [answers[i] for i in idx],
                                                rollout_engine, verify, tok, tcfg, cfg.max_response_tokens, random)
            except FloatingPointError as e:
                raise UserError(f"step {step + 1}: {e}; the weights or the inputs are not finite "
                                f"(lower lr, now {cfg.lr:g}?)") from None
            t1 = time.time()
            trajs = []
            for t in trees:
                ibtpo.compute_advantages(t, cfg.beta, cfg.lam, cfg.step_prob, cfg.sqrt_leaves)
                trajs += ibtpo.trajectories(t)
            train, skips = update(model, ref, optimizer, scheduler, trajs, cfg, tok, world, device)
            row = {"step": step + 1, **batch_metrics(trees, verdicts, tcfg, world, device), **train,
                   "time_rollout": t1 - t0, "time_train": time.time() - t1}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                row.update(evaluate(model, tok, eval_sets, cfg, rank, world, device))
            if step + 1 == total and eval_sets:
                row.update(evaluate(model, tok, eval_sets, cfg, rank, world, device))
            log(row)
            last = row
            if rank == 0:
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", eff=f"{row['eff_rate']:.2f}",
                                ib=f"{row['ib_score']:.3f}")
                if (step + 1) % cfg.log_every == 0:
                    bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()))
            for skipped in skips:
                skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            if any(skips):
                say(f"step {step + 1}: skipped {sum(skips)} optimizer update(s): non-finite loss "
                    f"or gradient norm", file=sys.stderr)
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                done = checkpoint.complete_checkpoints(cfg.run_dir)
                raise UserError(f"training diverged: {skipped_in_a_row} optimizer updates in a row had a "
                                f"non-finite loss or gradient (step {step + 1}); the last checkpoint is "
                                f"{done[-1][1] if done else 'none'}; lower lr (now {cfg.lr:g})")
            saved = (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == total
            stopping = all_max(stop.signum, device)
            if saved or stopping:
                path = checkpoint.save_checkpoint(model, optimizer, tok, cfg, step + 1, rank)
            if step + 1 == total and rank == 0:  # this rank's trees of the last step, to read and to look at
                plots.write_trees(cfg.run_dir, [plots.to_record(t, tok, tcfg) for t in trees], cfg.dump_trees)
            if stopping and step + 1 < total:
                bar.close()
                raise checkpoint.Stopped(stopping, step + 1, path)
    if rank == 0:
        plots.plot_metrics(cfg.run_dir)
        if eval_sets and last:
            first = checkpoint.read_metrics(metrics_path)[0]
            for k in sorted(k for k in last if k.startswith("eval/")):
                print(f"{k}: {first.get(k, float('nan')):.3f} before training -> {last[k]:.3f} after {total} steps")
    return last or (history[-1] if history else {})


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        exit_with(e)
    except checkpoint.Stopped as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
