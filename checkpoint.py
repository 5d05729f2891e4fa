"""The run directory: checkpoints a crash cannot corrupt, a metrics file that loses
nothing, the decision to start afresh or resume, and stopping on a signal.

    run_dir/config.yaml          the resolved config (written once the run is set up to train)
    run_dir/metrics.jsonl        one JSON line per step; step 0 is the evaluation before training
    run_dir/metrics.png, trees.* the pictures and the last step's trees (plots.py)
    run_dir/checkpoints/step_N/  hf/ (save_pretrained + tokenizer: loads with from_pretrained),
                                 state/ (torch.distributed.checkpoint of the sharded model and
                                 optimizer), rng_<r>.pt (every rank's RNG), meta.json (the step)
    run_dir/checkpoints/latest   the name of the newest complete checkpoint

Writing. A checkpoint is written to step_N.tmp and renamed when complete, then `latest`
is replaced atomically; retention deletes only checkpoints older than the one just
written. A failed write (disk full, read-only) on any rank fails the save on every rank,
removes the .tmp and keeps the previous checkpoint. Metrics lines are appended whole and
flushed; the file is rewritten only as a new file renamed over the old one.

Stopping (Stop). SIGTERM or SIGINT sets a flag; train.py checks it on every rank
after each step, saves a checkpoint and exits with 128 + the signal's number.

Starting (start). With a complete checkpoint in run_dir and resume: true (the default)
the run resumes from it, unless the config differs from the saved config.yaml in a key
outside SAFE_TO_CHANGE (resume: force resumes anyway); with resume: false it refuses,
since starting afresh would overwrite that run. No checkpoint: a fresh run. The data
order is a function of (seed, step) and the LR schedule of the step, so restoring the
weights, optimizer and RNG gives the batch an uninterrupted run would have drawn.
"""
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from config import UserError

# Keys that may change between a run and its resumption: how long, how often, how it is evaluated.
SAFE_TO_CHANGE = {"steps", "run_dir", "resume", "log_every", "save_every", "keep_checkpoints", "eval_every",
                  "eval_sets", "eval_k", "eval_max_questions", "eval_temperature", "eval_top_p", "dump_trees",
                  "verifier_timeout"}
STEP_DIR = re.compile(r"step_(\d+)$")


def warn(message: str) -> None:
    """A warning, printed by rank 0 only (every rank reads the same run_dir)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}")


def agree(ok: bool) -> bool:
    """True on every rank if ok on every rank (a collective: every rank must call it)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    t = torch.tensor([int(ok)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# ----------------------------------------------------------------------------
# Metrics

def read_metrics(path: str) -> list[dict]:
    """The rows of metrics.jsonl. A half-written last line (a crash or a full disk
    during the write) is dropped with a warning; a bad line before it is an error."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")  # the last piece is b"" when the file ends cleanly
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a JSON object with an integer 'step'")
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
            if i == len(lines):
                warn(f"{path}: dropped a half-written last line ({len(line)} bytes)")
                continue
            raise UserError(f"{path}: line {i} is not a metrics row ({e}); fix or delete that line") from None
        rows.append(row)
    return rows


def write_metrics(path: str, rows: list[dict]) -> None:
    """Replace the file with these rows: a new file, renamed over the old one."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def append_metrics(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------
# Finding, checking and restoring a checkpoint

def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints (renamed from .tmp, meta.json present), by step."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "meta.json")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_checkpoint(run_dir: str) -> tuple[int, str] | None:
    """(step, path) of the checkpoint to resume: the one `latest` names, or, with no
    `latest` (deleted) or one naming a checkpoint that is gone, the newest complete one."""
    done = complete_checkpoints(run_dir)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return done[-1] if done else None
    with open(latest, "rb") as f:
        raw = f.read(200)
    try:
        m = STEP_DIR.match(raw.decode().strip())
    except UnicodeDecodeError:
        m = None
    if m is None:
        hint = f"the newest complete checkpoint is {done[-1][1]}; delete {latest} to resume from it" if done \
            else f"there is no complete checkpoint; delete {latest} to start afresh"
        raise UserError(f"{latest} is corrupt (it holds {raw[:40]!r}, not a checkpoint name); {hint}")
    step = int(m.group(1))
    for s, path in done:
        if s == step:
            return s, path
    if done:
        warn(f"{latest} names step_{step:06d}, which is missing or incomplete; "
             f"resuming from the newest complete checkpoint, {done[-1][1]}")
        return done[-1]
    return None


def config_changes(saved: dict, cfg) -> dict:
    """{key: (saved, now)} for the keys outside SAFE_TO_CHANGE that differ."""
    import dataclasses
    now = dataclasses.asdict(cfg)
    return {k: (saved[k], now[k]) for k in sorted(set(saved) & set(now))
            if k not in SAFE_TO_CHANGE and saved[k] != now[k]}


def start(cfg) -> tuple[int, str | None, str]:
    """Decide how this run starts (module docstring): (step, checkpoint path or None,
    a line saying so). Raises UserError when resuming would mix two runs."""
    import yaml
    found = find_checkpoint(cfg.run_dir)
    if found is None:
        return 0, None, f"fresh run in {cfg.run_dir}"
    step, path = found
    if cfg.resume == "false":
        raise UserError(f"{cfg.run_dir} already holds a run (checkpoints up to {os.path.basename(path)}); "
                        f"resume=true continues it; to start over, choose another run_dir or delete this one")
    saved_path = os.path.join(cfg.run_dir, "config.yaml")
    saved = {}
    if os.path.isfile(saved_path):
        with open(saved_path) as f:
            saved = yaml.safe_load(f) or {}
    changes = config_changes(saved, cfg)
    if changes and cfg.resume != "force":
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
        raise UserError(f"{cfg.run_dir} was trained to step {step} with other settings ({listed}); "
                        f"give it another run_dir, or resume=force to continue it with these")
    note = f"resuming from step {step} of {cfg.run_dir}"
    if changes:
        note += f" (resume=force: changed {', '.join(changes)})"
    return step, path, note


def check_writable(run_dir: str, rank: int) -> None:
    """Write and remove a probe file in run_dir and run_dir/checkpoints, on every rank,
    before any training: a run must not find out at its first save."""
    root = os.path.join(run_dir, "checkpoints")
    error = None
    for folder in (run_dir, root):
        probe = os.path.join(folder, f".probe-{rank}-{os.getpid()}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            error = error or f"{folder} is not writable ({e.strerror or e})"
    if not agree(error is None):
        raise UserError(error or "a checkpoint folder is not writable on another rank")


def load_checkpoint(model, optimizer, path: str, rank: int) -> int:
    """Restore weights, optimizer and RNG from checkpoint `path`; returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    older = [p for _, p in complete_checkpoints(os.path.dirname(os.path.dirname(path))) if p != path]
    error = None
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "state"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = torch.load(os.path.join(path, f"rng_{rank}.pt"), weights_only=False)
        with open(os.path.join(path, "meta.json")) as f:
            step = json.load(f)["step"]
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, CheckpointException) as e:
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    if not agree(error is None):
        hint = f"; the previous complete one is {older[-1]}: delete {path} to resume from it" if older else ""
        raise UserError(f"checkpoint {path} is incomplete or corrupt ({error or 'on another rank'}){hint}")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return step


# ----------------------------------------------------------------------------
# Saving

def save_checkpoint(model, optimizer, tok, cfg, step: int, rank: int) -> str:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)
    root = os.path.join(cfg.run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    done = complete_checkpoints(cfg.run_dir)
    kept = f"the previous checkpoint, {done[-1][1]}, is kept" if done else "no earlier checkpoint exists"

    def everywhere(stage):  # run a stage on this rank; if it failed on any rank, fail on all
        error = None
        try:
            stage()
        except (OSError, CheckpointException) as e:
            error = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if not agree(error is None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not write checkpoint {final} ({error or 'failed on another rank'}); {kept}")

    if not agree(all(bool(torch.isfinite(getattr(p, "to_local", lambda: p)()).all()) for p in model.parameters())):
        raise UserError(f"the weights at step {step} are not finite: no checkpoint written; {kept}")

    def make_tmp():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    everywhere(make_tmp)
    # 1. the model in Hugging Face format (gathered to rank 0 on the CPU)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write_hf():
        if rank == 0:
            model.save_pretrained(os.path.join(tmp, "hf"), state_dict=full)
            tok.save_pretrained(os.path.join(tmp, "hf"))
    everywhere(write_hf)
    del full
    # 2. the resumable state: sharded model + optimizer (every rank writes its shard), RNG per rank
    model_sd, optim_sd = get_state_dict(model, optimizer)

    def write_state():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "state"))
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   os.path.join(tmp, f"rng_{rank}.pt"))
    everywhere(write_state)

    def publish():  # complete: rename, point latest at it, then retention
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"step": step}, f)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            with open(os.path.join(root, "latest.tmp"), "w") as f:
                f.write(os.path.basename(final))
            os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
            prune(cfg.run_dir, step, cfg.keep_checkpoints)
    everywhere(publish)
    return final


def prune(run_dir: str, step: int, keep: int) -> None:
    """Keep the checkpoint of `step` and the newest keep - 1 older ones (by step
    number, not name); never touch a newer one (it is not this run's to judge)."""
    older = [path for s, path in complete_checkpoints(run_dir) if s < step]
    for path in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------
# Stopping on a signal

class Stop:
    """SIGTERM (schedulers send it before a kill) and SIGINT: every rank finishes
    its step, the run saves a checkpoint and exits with 128 + the signal's number.
    A second signal stops at once."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\n{signal.Signals(signum).name}: saving after this step (again to stop at once)", file=sys.stderr)


class Stopped(Exception):
    """Raised by train.main once the checkpoint a signal asked for is written."""

    def __init__(self, signum: int, step: int, path: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {path}; "
                         f"the same command resumes from there")
        self.exit_code = 128 + signum
