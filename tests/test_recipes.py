"""Every shipped paper recipe (configs/qwen3_*.yaml) runs as written, with only the
model and the data swapped for local stand-ins: the tests' terse tiny model, and
folders laid out like the hub sets it names, with their columns and text formats
(conftest.hub_standins). One epoch of the 128-question stand-in is one step, so the
run is: evaluation, one training step, checkpoint, evaluation."""
import glob
import json
import os

import pytest
import yaml

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "qwen3_*.yaml")))


def standin_overrides(recipe: str, hub: str, model: str, run_dir) -> list[str]:
    """model -> the tiny model; every hub id -> the folder root/<hub id>, split kept."""
    raw = yaml.safe_load(open(recipe))
    evals = []
    for spec in raw["eval_sets"]:  # "hub_id[@split]"
        evals.append(os.path.join(hub, spec))
    return [f"model={model}", f"data={os.path.join(hub, raw['data'])}", f"eval_sets=[{','.join(evals)}]",
            f"run_dir={run_dir}"]


def test_there_are_four_recipes():
    assert [os.path.basename(r) for r in RECIPES] == [
        "qwen3_1p7b_grpo.yaml", "qwen3_1p7b_ibtpo.yaml", "qwen3_8b_grpo.yaml", "qwen3_8b_ibtpo.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_runs_a_step_and_its_evaluation(recipe, hub_standins, terse_dir, tmp_path, capsys):
    raw = yaml.safe_load(open(recipe))
    run_dir = tmp_path / "run"
    last = train.main([recipe, *standin_overrides(recipe, hub_standins, terse_dir, run_dir)])
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    evals = {"eval/MATH-500", "eval/aime_2024", "eval/amc23"}
    assert [r["step"] for r in rows] == [0, 1]
    assert evals <= set(rows[0]) and evals <= set(rows[1]) and last == rows[1]
    G = raw["B0"] + (raw["L"] - 1) * raw["K"] * raw["B"]
    assert last["trajectories"] == raw["questions_per_step"] * G
    assert 0 < last["avg_rate"] < 1  # the terse model is right now and then: real rewards
    assert last["verifier_errors"] == last["verifier_timeouts"] == 0
    assert last["lr"] == raw["lr"]
    assert all(0 <= rows[k][e] <= 1 for k in (0, 1) for e in evals)
    assert (run_dir / "checkpoints" / "step_000001" / "hf" / "config.json").exists()
    # every key but the swapped ones is the recipe's own
    saved = yaml.safe_load(open(run_dir / "config.yaml"))
    for key, value in raw.items():
        if key not in ("model", "data", "eval_sets", "run_dir"):
            assert saved[key] == value, key
    out = capsys.readouterr().out
    assert "DAPO's 'Answer:' instruction removed from 128" in out
    assert "eval set MATH-500: 3 questions (fields 'problem' -> 'answer')" in out
