"""The README's main job end to end at fast settings: toy.prepare writes the
world and a warm-started model, train.py trains it with configs/toy.yaml, and
held-out accuracy rises clearly from the warm start (fixed seed)."""
import json
import os

import toy
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ib_tpo_improves_the_warm_started_toy_policy(tmp_path):
    data = tmp_path / "toy_data"
    toy.prepare(str(data), seed=0, task={"n_train": 1000, "n_eval": 100}, measure=False, log=None)
    run = tmp_path / "run"
    last = train.main([os.path.join(ROOT, "configs", "toy.yaml"), f"model={data / 'model'}",
                       f"data={data / 'train.jsonl'}", f"eval_sets=[{data / 'eval.jsonl'}]",
                       f"run_dir={run}", "steps=12", "eval_every=0", "eval_k=4", "seed=0"])
    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    before, after = rows[0]["eval/eval"], last["eval/eval"]
    assert rows[0]["step"] == 0 and last["step"] == 12
    assert 0.2 < before < 0.8, before  # the warm start is right some of the time
    # 12 steps gave +0.12 to +0.22 over seeds 0-3 with this engine and the one before it,
    # whose random streams differ; with lr=1e-12 (no learning) seeds 0-2 moved -0.03, +0.03,
    # +0.07 (400 samples per evaluation). 2026-11-27.
    assert after >= before + 0.10, (before, after)
    assert (run / "trees.txt").read_text().count("\\boxed") > 0
