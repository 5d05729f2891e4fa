"""toy.py: the synthetic arithmetic task, its corruption, prepare() and its cache,
and a short warm start that learns the answer format."""
import os
import random
import re
import time

import pytest

import toy

STEP = re.compile(r"(\d+)([+-])(\d+)=(-?\d+)")
SMALL = dict(n_train=300, n_eval=30, n_dev=30)
QUICK = dict(clean_steps=2, slip_steps=1, batch=4, target=0.5, band=0.5, check_every=1, check_samples=1)  # stops at once


def parse(text):
    """[(a, d, c)] for the steps 'a+-b=c', and the boxed answer."""
    *steps, last = text.split("\n\n")
    out = []
    for s in steps:
        m = STEP.fullmatch(s)
        assert m, s
        out.append((int(m[1]), int(m[3]) * (1 if m[2] == "+" else -1), int(m[4])))
    m = re.fullmatch(r"\\boxed\{(-?\d+)\}", last)
    assert m, last
    return out, int(m[1])


def test_problems_are_deterministic_distinct_and_split_disjointly():
    train, held, dev = toy.make_splits(0, **toy.TASK)
    assert (train, held, dev) == toy.make_splits(0, **toy.TASK)
    assert toy.make_splits(1, **toy.TASK)[1] != held
    assert (len(train), len(held), len(dev)) == (toy.TASK["n_train"], toy.TASK["n_eval"], toy.TASK["n_dev"])
    qs = [toy.question(t) for t in train + held + dev]
    assert len(set(qs)) == len(qs)  # distinct, so train, eval and dev are disjoint
    for t in train + held + dev:
        assert toy.TASK["min_ops"] <= len(t) - 1 <= toy.TASK["max_ops"]
        assert all(0 <= sum(t[:i + 1]) <= toy.TASK["max_value"] for i in range(len(t)))
        assert all(1 <= abs(d) <= toy.TASK["max_operand"] for d in t)
    assert toy.question([7, 5, -3, 8]) == "Compute 7+5-3+8."
    assert toy.rows([[7, 5, -3, 8]]) == [{"question": "Compute 7+5-3+8.", "answer": "17"}]


def test_clean_solutions_are_correct_arithmetic():
    assert toy.solution([7, 5, -3, 8]) == "7+5=12\n\n12-3=9\n\n9+8=17\n\n\\boxed{17}"
    import reward
    for t in toy.make_splits(0, **SMALL)[0]:
        steps, boxed = parse(toy.solution(t))
        assert [d for _, d, _ in steps] == t[1:] and steps[0][0] == t[0]
        for i, (a, d, c) in enumerate(steps):
            assert a + d == c == sum(t[:i + 2])
        assert boxed == sum(t)
    assert reward.score(toy.solution([7, 5, -3, 8]), "17") == 1.0


def test_a_corrupted_solution_is_wrong_exactly_at_its_slips_and_consistent_after():
    rng, seen = random.Random(0), 0
    for t in toy.make_splits(0, **SMALL)[0]:
        slips = toy.corrupt(t, rng, p_slip=0.5, max_slip=2)
        steps, boxed = parse(toy.solution(t, slips))
        prev = t[0]
        for k, (a, d, c) in enumerate(steps):
            assert a == prev and d == t[k + 1]          # each step starts from the value written above it
            assert c - (a + d) == slips.get(k, 0)        # wrong exactly at the stated steps, by the offset
            assert c >= 0 and (k not in slips or 1 <= abs(slips[k]) <= 2)
            prev = c
        assert boxed == prev == sum(t) + sum(slips.values())  # the error propagates to the answer
        assert (boxed == sum(t)) == (not slips)                  # slips never cancel out
        seen += bool(slips)
    assert 0 < seen < len(toy.make_splits(0, **SMALL)[0])
    assert toy.corrupt([5, 3], random.Random(0), p_slip=0.0) == {}


def test_prompt_is_what_train_py_feeds_the_policy():
    import config
    import data
    tok = toy.build_tokenizer()
    q = "Compute 7+5-3+8."
    ids = toy.prompt_ids(tok, q)
    assert tok.decode(ids) == f"<|user|>\n{q}\n<|assistant|>\n"
    assert ids == data.encode_prompt(tok, q, config.Config(prompt_template="{question}", chat_template=True))


def test_prepare_writes_loadable_files_and_is_cached(tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = str(tmp_path / "toy")
    warm = QUICK
    res = toy.prepare(out, seed=3, task=SMALL, warm=warm, measure=False, log=None)
    assert not res["cached"] and res["settings"]["seed"] == 3
    assert res["results"]["warm_start_steps"] == 3 and 0 <= res["results"]["dev_accuracy"] <= 1
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "model"))
    assert model.config.hidden_size == toy.WARM["hidden"] and model.config.vocab_size == len(tok) + 16
    assert toy.prompt_ids(tok, "Compute 1+2.") == toy.prompt_ids(toy.build_tokenizer(), "Compute 1+2.")
    sets = {}
    for name in ("train", "eval"):
        ds = load_dataset("json", data_files=os.path.join(out, f"{name}.jsonl"))["train"]
        assert {"question", "answer"} <= set(ds.column_names)
        sets[name] = set(ds["question"])
    assert len(sets["train"]) == SMALL["n_train"] and len(sets["eval"]) == SMALL["n_eval"]
    assert not sets["train"] & sets["eval"]

    weights = os.path.join(out, "model", "model.safetensors")
    stamp = os.path.getmtime(weights)
    t0 = time.time()
    again = toy.prepare(out, seed=3, task=SMALL, warm=warm, measure=False, log=None)
    assert again["cached"] and time.time() - t0 < 2 and os.path.getmtime(weights) == stamp
    assert not toy.prepare(out, seed=4, task=SMALL, warm=warm, measure=False, log=None)["cached"]


def test_a_short_warm_start_learns_the_format():
    tok = toy.build_tokenizer()
    train, held, dev = toy.make_splits(0, **SMALL)
    model, step, _ = toy.warm_start(tok, train, toy.rows(dev), seed=0,
                                    **{**toy.WARM, **QUICK, "clean_steps": 150, "batch": 32}, log=None)
    assert step == 151
    acc, texts = toy.evaluate(model, tok, toy.rows(held), temperature=0.7)
    assert 0.0 <= acc <= 1.0
    well_formed = [t for t in texts if re.fullmatch(r"(\d+[+-]\d+=-?\d+\n\n)+\\boxed\{-?\d+\}", t)]
    assert len(well_formed) >= 0.8 * len(texts), texts[:5]


def test_the_warm_start_stops_at_the_first_check_inside_the_band(monkeypatch):
    """The rule itself, with the dev accuracy scripted: checks every check_every
    slip steps, stops at the first within target +- band, fails when none is."""
    script = iter([0.95, 0.62, 0.41, 0.36, 0.33])
    monkeypatch.setattr(toy, "evaluate", lambda *a, **k: (next(script), []))
    tok = toy.build_tokenizer()
    train, _, dev = toy.make_splits(0, **SMALL)
    fast = dict(toy.WARM, hidden=16, layers=1, batch=2, clean_steps=3, slip_steps=2, check_every=2, check_samples=1)
    _, step, acc = toy.warm_start(tok, train, toy.rows(dev), 0, **fast, log=None)
    # checks every 2 steps once 2 slipped steps are done: steps 5, 7, 9, 11; the 4th (0.36) is the first inside
    assert (step, acc) == (3 + 2 + 3 * 2, 0.36)
    monkeypatch.setattr(toy, "evaluate", lambda *a, **k: (0.9, []))
    with pytest.raises(RuntimeError, match="did not reach dev accuracy 0.35"):
        toy.warm_start(tok, train, toy.rows(dev), 0, **{**fast, "max_steps": 9}, log=None)
