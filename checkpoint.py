"""Checkpoints that a crash cannot corrupt, and exact resumption.

A checkpoint is a folder run_dir/checkpoints/step_N with
  hf/          the model in Hugging Face format (gathered to rank 0) + tokenizer:
               loads with from_pretrained, for evaluation or as a new start;
  state/       torch.distributed.checkpoint of the sharded model and optimizer;
  rng_<r>.pt   every rank's torch / python / cuda RNG state;
  meta.json    the step.
It is written to step_N.tmp and renamed when complete; run_dir/checkpoints/latest
(replaced atomically) names the last complete one. The data order is a function
of (seed, step) and the LR schedule of the step, so restoring these gives the
same next batch as an uninterrupted run.
"""
import json
import os
import random
import shutil

import torch
import torch.distributed as dist



def save_checkpoint(model, optimizer, tok, cfg, step: int, rank: int) -> str:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)
    root = os.path.join(cfg.run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    # 1. the model in Hugging Face format (gathered to rank 0 on the CPU)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(os.path.join(tmp, "hf"), state_dict=full)
        tok.save_pretrained(os.path.join(tmp, "hf"))
    del full
    # 2. the resumable state: sharded model + optimizer (every rank writes its shard), RNG per rank
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "state"))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[:-cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(model, optimizer, cfg, rank: int) -> int:
    """Restore the latest good checkpoint of run_dir; returns its step (0: none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    latest = os.path.join(cfg.run_dir, "checkpoints", "latest")
    if not (cfg.resume and os.path.isfile(latest)):
        return 0
    with open(latest) as f:
        path = os.path.join(cfg.run_dir, "checkpoints", f.read().strip())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = torch.load(os.path.join(path, f"rng_{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)["step"]
