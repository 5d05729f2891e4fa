"""The README's main job end to end: toy.prepare writes the world and its
warm-started model (the default settings: the stopping rule on the dev split),
train.py trains it with configs/toy.yaml, and held-out accuracy rises clearly
from the warm start (fixed seed). The warm start lands inside its band with 1
and with 2 threads."""
import json
import os

import pytest

import toy
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The default toy world, as `python toy.py prepare` writes it (1 thread)."""
    out = tmp_path_factory.mktemp("toy") / "toy_data"
    return str(out), toy.prepare(str(out), seed=0, measure=False, log=None)


def test_the_warm_start_lands_in_its_band_whatever_the_threads(world, tmp_path):
    """Float differences between thread settings once moved the start from 0.345
    to 0.49; the rule stops on the measured dev accuracy instead."""
    _, one = world
    two = toy.prepare(str(tmp_path / "two"), seed=0, warm={"threads": 2}, measure=False, log=None)
    for res in (one, two):
        warm = res["settings"]["warm"]
        assert abs(res["results"]["dev_accuracy"] - warm["target"]) <= warm["band"]
        assert res["results"]["warm_start_steps"] > warm["clean_steps"]
    assert (one["settings"]["warm"]["threads"], two["settings"]["warm"]["threads"]) == (1, 2)


def test_ib_tpo_improves_the_warm_started_toy_policy(world, tmp_path):
    data, _ = world
    run = tmp_path / "run"
    last = train.main([os.path.join(ROOT, "configs", "toy.yaml"), f"model={data}/model", f"data={data}/train.jsonl",
                       f"eval_sets=[{data}/eval.jsonl]", f"run_dir={run}", "steps=30", "eval_every=0", "eval_k=4",
                       "seed=0"])
    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    before, after = rows[0]["eval/eval"], last["eval/eval"]
    assert rows[0]["step"] == 0 and last["step"] == 30
    assert 0.2 < before < 0.6, before  # the warm start is right some of the time
    # Measured on 2026-12-02 (`python bench.py toy`: eval_k=4 on the 200 held-out problems every
    # 10 steps, this warm start): the gain after 30 steps was +0.156..+0.234 over 20 runs (GRPO,
    # IBTree and IB-TPO, seeds 0-7), after 20 steps +0.074..+0.190 (this test once saw +0.09 at
    # 20). With lr=1e-12 (no learning) the gain after 20 steps was +0.006, -0.028, -0.015 (seeds
    # 0-2, 2026-12-01): evaluation noise. +0.10 after 30 steps sits between the two.
    assert after >= before + 0.10, (before, after)
    assert (run / "trees.txt").read_text().count("\\boxed") > 0
    assert (run / "trees.png").exists() and len((run / "trees.jsonl").read_text().splitlines()) == 16
