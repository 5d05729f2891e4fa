"""The fixtures themselves: real loaders, exact round trips."""
import torch


def test_tiny_tokenizer_round_trip(tiny_dir, tiny_tokenizer):
    from toy import build_tokenizer
    text = "Compute 7+5-3.\n\n7+5=12\n\n\\boxed{9} é"
    fresh = build_tokenizer()
    # Saved and reloaded through AutoTokenizer, the ids must not change.
    assert tiny_tokenizer(text)["input_ids"] == fresh(text)["input_ids"]
    assert tiny_tokenizer.decode(fresh(text)["input_ids"]) == text
    assert tiny_tokenizer.pad_token_id == 0 and tiny_tokenizer.eos_token_id == 1
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"


def test_tiny_model_loads_and_pads_vocab(tiny_model, tiny_tokenizer):
    assert type(tiny_model).__name__ == "LlamaForCausalLM"
    assert tiny_model.config.vocab_size > len(tiny_tokenizer)  # padded like Qwen's
    out = tiny_model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, tiny_model.config.vocab_size)


def test_smollm_tokenizer_is_real_bpe(smollm_tokenizer):
    ids = smollm_tokenizer("Step one.\n\nStep two.")["input_ids"]
    assert len(ids) < len("Step one.\n\nStep two.")  # merges happen
    assert smollm_tokenizer.eos_token == "<|im_end|>"


def test_math_jsonl_loads_with_datasets(math_jsonl):
    from datasets import load_dataset
    ds = load_dataset("json", data_files=math_jsonl, split="train")
    assert len(ds) == 6 and set(ds.column_names) == {"question", "answer"}
