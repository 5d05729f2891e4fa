"""Training and evaluation questions: hub ids or local files through
datasets.load_dataset, question/answer fields found by name, prompts encoded
with the config's template (and the tokenizer's chat template), and the seeded
batch order that makes resuming exact.

Fields. The training set's fields are `question_field` / `answer_field` of the
config ("auto" finds them by name). Each eval set finds its own, since the sets
differ (MATH-500: problem, answer; AMC 23: question, answer), or names them in
its spec: `path_or_hub_id[@split][:question_field:answer_field]`. The gold is
the final-answer column: `answer` comes before `solution` (MATH-500's solution
is the worked solution).

Bad input is a UserError naming the file and row: an empty file, blank lines, bytes
that are not UTF-8, a line that is not JSON, a row whose question is not text or an
empty chat, a hub id that cannot be reached. Rows whose gold answer the verifier
cannot score (empty, `N/A`, free text) are dropped at load and reported, since every
response to them would score 0.

One answer format. The verifier reads the last \\boxed{} (reward.py) and the
default prompt template asks for it. open-r1/DAPO-Math-17k-Processed keeps
DAPO's own instruction around each problem (solve step by step, last line
`Answer: $Answer`, a reminder after the problem): that wrapper is removed, so
no prompt asks for two formats (problem_text).
"""
from __future__ import annotations

import json
import os

import torch

from config import Config, UserError, explained, parse_spec

QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution", "ground_truth", "final_answer")

# DAPO-Math-17k's user message: INSTRUCTION + "\n\n" + problem + "\n\n" + REMINDER
DAPO_INSTRUCTION = ("Solve the following math problem step by step. The last line of your response "
                    "should be of the form Answer: $Answer")
DAPO_REMINDER = 'Remember to put your answer on its own line after "Answer:"'


def has_dapo_instruction(question: str) -> bool:
    return question.startswith(DAPO_INSTRUCTION) or ("\n\n" + DAPO_REMINDER) in question


def problem_text(question: str) -> str:
    """The problem without DAPO's answer-format instruction (unchanged if it has none)."""
    if not has_dapo_instruction(question):
        return question
    if question.startswith(DAPO_INSTRUCTION) and "\n\n" in question:
        question = question.split("\n\n", 1)[1]
    cut = question.rfind("\n\n" + DAPO_REMINDER)
    if cut >= 0:
        question = question[:cut]
    return question.strip()


def check_file(path: str) -> None:
    """What datasets would report without the file's name (StopIteration, a bare
    UnicodeDecodeError, DatasetGenerationError), said with it and the line."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise UserError(f"{path} is empty" if not data else f"{path} holds only blank lines: no rows")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 text (byte {data[e.start]:#04x})") from None
    if path.lower().endswith(".json"):
        try:
            json.loads(text)
            return  # one JSON document
        except ValueError:
            pass    # JSON lines in a .json file
    if path.lower().endswith((".json", ".jsonl")):
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path}: line {i} is not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}: line {i} is not a JSON object (a row needs named fields)")


def load_split(spec: str, subset: str = "", split: str | None = None):
    """A datasets.Dataset from a hub id, a local folder or a .json/.jsonl/.parquet/.csv file."""
    from datasets import load_dataset
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    ext = os.path.splitext(spec)[1].lower()
    try:
        if ext in (".json", ".jsonl", ".parquet", ".csv"):
            if not os.path.isfile(spec):
                raise UserError(f"data file not found: {spec}")
            check_file(spec)
            return load_dataset({".jsonl": "json"}.get(ext, ext[1:]), data_files=spec, split="train")
        ds = explained("data", spec, lambda s: load_dataset(s, subset or None))
    except (ValueError, TypeError) as e:  # datasets' own complaints: no data files, a bad config name
        text = str(e).strip()
        raise UserError(f"{spec}: datasets could not load it ({type(e).__name__}: "
                        f"{text.splitlines()[0][:300] if text else ''})") from None
    if split is None:
        split = "test" if "test" in ds else "train" if "train" in ds else next(iter(ds))
    if split not in ds:
        raise UserError(f"{spec} has no split {split!r}; it has {list(ds)}")
    return ds[split]



def pick_field(ds, wanted: str, candidates: tuple, what: str, source: str) -> str:
    cols = ds.column_names
    if wanted != "auto":
        if wanted not in cols:
            raise UserError(f"{source}: no {what} field {wanted!r}; columns are {cols}")
        return wanted
    for c in candidates:
        if c in cols:
            return c
    raise UserError(f"{source}: found no {what} field among {candidates}; columns are {cols}; "
                    f"set {what}_field in the config (or name the fields in the eval set's spec)")


def encode_prompt(tok, question: str, cfg: Config) -> list[int]:
    text = cfg.prompt_template.format(question=question)
    if cfg.chat_template and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": text}],
                                       add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(text)["input_ids"]


def load_questions(spec: str, tok, cfg: Config, subset: str = "", split: str | None = None,
                   fields: tuple[str, str] = ("auto", "auto")) -> tuple[list, list, dict]:
    """(prompt ids, gold answers, report) of a dataset. Prompts over
    max_prompt_tokens, and those whose gold the verifier cannot score, are dropped;
    report counts rows, both kinds of drop (with the first unscorable rows), DAPO
    instructions removed, and names the fields used."""
    import reward
    ds = load_split(spec, subset, split)
    q = pick_field(ds, fields[0], QUESTION_FIELDS, "question", spec)
    a = pick_field(ds, fields[1], ANSWER_FIELDS, "answer", spec)
    rows, stripped, too_long = [], 0, 0
    for i, row in enumerate(ds, 1):
        question, answer = row[q], row[a]
        if isinstance(question, list):  # chat-format prompt: the last message's text
            if not question or not isinstance(question[-1], dict) or "content" not in question[-1]:
                raise UserError(f"{spec}: row {i}: {q} is a chat with no message content ({question!r:.80})")
            question = question[-1]["content"]
        if not isinstance(question, str):
            raise UserError(f"{spec}: row {i}: {q} holds {type(question).__name__} {question!r:.80}, not text")
        if answer is None:
            raise UserError(f"{spec}: row {i}: {a} is empty (null)")
        stripped += has_dapo_instruction(question)
        ids = encode_prompt(tok, problem_text(question), cfg)
        if len(ids) > cfg.max_prompt_tokens:
            too_long += 1
        else:
            rows.append((i, ids, str(answer)))
    bad = reward.unscorable([g for _, _, g in rows], cfg.verifier_timeout)
    unscorable = [(i, g) for i, _, g in rows if g in bad]
    rows = [r for r in rows if r[2] not in bad]
    if not rows:
        raise UserError(f"{spec}: no usable questions among {len(ds)} rows ({too_long} longer than "
                        f"max_prompt_tokens={cfg.max_prompt_tokens}, {len(unscorable)} with a gold answer "
                        f"the verifier cannot score)")
    report = {"rows": len(ds), "kept": len(rows), "dropped": too_long, "unscorable": len(unscorable),
              "unscorable_rows": unscorable[:3], "dapo_instructions_removed": stripped, "fields": (q, a)}
    return [ids for _, ids, _ in rows], [g for _, _, g in rows], report


def describe(name: str, report: dict, cfg: Config) -> str:
    """One line for the start of a run: what was loaded from where."""
    line = (f"{name}: {report['kept']} questions (fields {report['fields'][0]!r} -> {report['fields'][1]!r})")
    if report["dropped"]:
        line += f", {report['dropped']} of {report['rows']} dropped (longer than max_prompt_tokens={cfg.max_prompt_tokens})"
    if report["unscorable"]:
        shown = ", ".join(f"row {i}: {g!r:.40}" for i, g in report["unscorable_rows"])
        line += f", {report['unscorable']} dropped whose gold answer the verifier cannot score ({shown})"
    if report["dapo_instructions_removed"]:
        line += f", DAPO's 'Answer:' instruction removed from {report['dapo_instructions_removed']}"
    return line


def batch_indices(step: int, n: int, cfg: Config, rank: int, world: int) -> list[int]:
    """This rank's question indices for `step`: a seeded permutation per epoch,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    out, Q = [], cfg.questions_per_step
    for g in range(step * Q, (step + 1) * Q):
        epoch, i = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        out.append(int(perm[i]))
    return out[rank::world]


def load_eval_sets(tok, cfg: Config) -> tuple[dict, dict]:
    """{name: (prompts, answers)} and {name: report}; each set detects its own fields
    unless its spec names them (module docstring)."""
    sets, reports = {}, {}
    for spec in cfg.eval_sets:
        path, split, qf, af = parse_spec(spec)
        name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
        prompts, answers, report = load_questions(path, tok, cfg, split=split, fields=(qf, af))
        n = cfg.eval_max_questions or len(prompts)
        sets[name], reports[name] = (prompts[:n], answers[:n]), report
    return sets, reports
