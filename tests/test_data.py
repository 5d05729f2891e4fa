"""data.py on stand-ins for the hub sets: eval sets find their own fields and golds,
DAPO's answer-format instruction is removed so a prompt asks for one format only,
and dropped prompts are counted."""
import json
import os

import pytest

import reward
from config import Config, UserError
from data import describe, load_eval_sets, load_questions, parse_spec, problem_text

EVAL_SPECS = ["HuggingFaceH4/MATH-500", "HuggingFaceH4/aime_2024@train", "math-ai/amc23"]  # the recipes'


def local(hub, spec):
    path, split, q, a = parse_spec(spec)
    return os.path.join(hub, path) + (f"@{split}" if split else "") + (f":{q}:{a}" if q != "auto" else "")


def test_eval_sets_find_their_own_fields_and_the_final_answer(hub_standins, tiny_tokenizer):
    # the recipes' training fields must not reach the eval sets
    cfg = Config(question_field="prompt", answer_field="solution", chat_template=False,
                 eval_sets=[local(hub_standins, s) for s in EVAL_SPECS])
    sets, reports = load_eval_sets(tiny_tokenizer, cfg)
    assert list(sets) == ["MATH-500", "aime_2024", "amc23"]
    assert reports["MATH-500"]["fields"] == ("problem", "answer")  # `answer` before the worked `solution`
    assert reports["aime_2024"]["fields"] == ("problem", "answer")
    assert reports["amc23"]["fields"] == ("question", "answer")
    prompts, golds = sets["MATH-500"]
    assert len(prompts) == 3 and all("\\boxed" not in g and len(g) <= 2 for g in golds)
    assert all(g.endswith(".0") for g in sets["amc23"][1])  # a number column, read as text
    assert reward.score("so \\boxed{%d}" % float(sets["amc23"][1][0]), sets["amc23"][1][0]) == 1.0


def test_an_eval_spec_can_name_its_fields(hub_standins, tiny_tokenizer):
    spec = os.path.join(hub_standins, "HuggingFaceH4", "MATH-500") + "@test:problem:solution"
    assert parse_spec(spec)[1:] == ("test", "problem", "solution")
    sets, reports = load_eval_sets(tiny_tokenizer, Config(eval_sets=[spec]))
    assert reports["MATH-500"]["fields"] == ("problem", "solution")
    assert all(g.startswith("We add") for g in sets["MATH-500"][1])
    with pytest.raises(UserError, match="no answer field 'nope'"):
        load_eval_sets(tiny_tokenizer, Config(eval_sets=[spec.replace(":solution", ":nope")]))


def test_parse_spec():
    assert parse_spec("org/name") == ("org/name", None, "auto", "auto")
    assert parse_spec("org/name@train") == ("org/name", "train", "auto", "auto")
    assert parse_spec("/d/x.jsonl:q:a") == ("/d/x.jsonl", None, "q", "a")


DAPO = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is $1+1$?\n\n"
        'Remember to put your answer on its own line after "Answer:".')


def test_problem_text_removes_dapos_wrapper_only():
    assert problem_text(DAPO) == "What is $1+1$?"
    assert problem_text("What is $1+1$?\n\n" + DAPO.rsplit("\n\n", 1)[1]) == "What is $1+1$?"
    plain = "Find $x$.\n\nAnswer in lowest terms. "
    assert problem_text(plain) is plain  # anything else untouched, whitespace included


def test_a_prompt_asks_for_one_answer_format(hub_standins, tiny_tokenizer):
    """The recipes' training prompts (DAPO's message, then the boxed template) ask for
    \\boxed{} alone, which is what the verifier reads."""
    cfg = Config(question_field="prompt", answer_field="solution", chat_template=False)
    prompts, golds, report = load_questions(os.path.join(hub_standins, "open-r1", "DAPO-Math-17k-Processed"),
                                            tiny_tokenizer, cfg, "en", fields=("prompt", "solution"))
    assert report["dapo_instructions_removed"] == len(prompts) == 128
    for ids in prompts[:5]:
        text = tiny_tokenizer.decode(ids, skip_special_tokens=True)
        assert text.count("\\boxed{}") == 1 and "Answer:" not in text and "$Answer" not in text
    assert text.startswith("Let $x =")
    # a response that does what the prompt asks scores 1; DAPO's own format would score 0
    assert reward.score(f"... so $x = {golds[4]}$.\n\n\\boxed{{{golds[4]}}}", golds[4]) == 1.0
    assert reward.score(f"... so $x = {golds[4]}$.\nAnswer: {golds[4]}", golds[4]) == 0.0


def test_dropped_prompts_are_counted(tiny_tokenizer, tmp_path):
    spec = tmp_path / "q.jsonl"
    spec.write_text("".join(json.dumps({"problem": "x" * n, "answer": "1"}) + "\n" for n in (10, 40, 400)))
    cfg = Config(chat_template=False, prompt_template="{question}", max_prompt_tokens=50)
    prompts, _, report = load_questions(str(spec), tiny_tokenizer, cfg)
    assert (report["rows"], report["kept"], report["dropped"]) == (3, 2, 1) and len(prompts) == 2
    assert "1 of 3 dropped (longer than max_prompt_tokens=50)" in describe("x", report, cfg)
    with pytest.raises(UserError, match="no usable questions"):
        load_questions(str(spec), tiny_tokenizer, Config(chat_template=False, max_prompt_tokens=5))
