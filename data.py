"""Training and evaluation questions: hub ids or local files through
datasets.load_dataset, question/answer fields found by name, prompts encoded
with the config's template (and the tokenizer's chat template), and the seeded
batch order that makes resuming exact."""
from __future__ import annotations

import os

import torch

from config import Config

QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution", "ground_truth", "final_answer")


def load_split(spec: str, subset: str = "", split: str | None = None):
    """A datasets.Dataset from a hub id, a local folder or a .json/.jsonl/.parquet file."""
    from datasets import load_dataset
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    ext = os.path.splitext(spec)[1].lower()
    if ext in (".json", ".jsonl", ".parquet", ".csv"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"data file not found: {spec}")
        kind = {".jsonl": "json"}.get(ext, ext[1:])
        return load_dataset(kind, data_files=spec, split="train")
    ds = load_dataset(spec, subset or None)
    if split is None:
        split = "test" if "test" in ds else "train" if "train" in ds else next(iter(ds))
    if split not in ds:
        raise ValueError(f"{spec} has no split {split!r}; it has {list(ds)}")
    return ds[split]


def pick_field(ds, wanted: str, candidates: tuple, what: str, source: str) -> str:
    cols = ds.column_names
    if wanted != "auto":
        if wanted not in cols:
            raise ValueError(f"{source}: no {what} field {wanted!r}; columns are {cols}")
        return wanted
    for c in candidates:
        if c in cols:
            return c
    raise ValueError(f"{source}: found no {what} field among {candidates}; columns are {cols}; "
                     f"set {what}_field in the config")


def encode_prompt(tok, question: str, cfg: Config) -> list[int]:
    text = cfg.prompt_template.format(question=question)
    if cfg.chat_template and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": text}],
                                       add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(text)["input_ids"]


def load_questions(spec: str, tok, cfg: Config, subset: str = "", split: str | None = None):
    """(prompt ids, gold answers) of a dataset; prompts over max_prompt_tokens are dropped."""
    ds = load_split(spec, subset, split)
    q = pick_field(ds, cfg.question_field, QUESTION_FIELDS, "question", spec)
    a = pick_field(ds, cfg.answer_field, ANSWER_FIELDS, "answer", spec)
    prompts, answers = [], []
    for row in ds:
        question, answer = row[q], row[a]
        if isinstance(question, list):  # chat-format prompt: take the last message's text
            question = question[-1]["content"]
        if not isinstance(question, str) or answer is None:
            raise ValueError(f"{spec}: bad row, {q}={question!r} {a}={answer!r}")
        ids = encode_prompt(tok, question, cfg)
        if len(ids) <= cfg.max_prompt_tokens:
            prompts.append(ids)
            answers.append(str(answer))
    if not prompts:
        raise ValueError(f"{spec}: no usable questions (all longer than max_prompt_tokens?)")
    return prompts, answers


def batch_indices(step: int, n: int, cfg: Config, rank: int, world: int) -> list[int]:
    """This rank's question indices for `step`: a seeded permutation per epoch,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    out, Q = [], cfg.questions_per_step
    for g in range(step * Q, (step + 1) * Q):
        epoch, i = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        out.append(int(perm[i]))
    return out[rank::world]


def load_eval_sets(tok, cfg: Config) -> dict:
    sets = {}
    for spec in cfg.eval_sets:
        name = os.path.splitext(os.path.basename(spec.split("@")[0].rstrip("/")))[0]
        prompts, answers = load_questions(spec, tok, cfg)
        n = cfg.eval_max_questions or len(prompts)
        sets[name] = (prompts[:n], answers[:n])
    return sets
