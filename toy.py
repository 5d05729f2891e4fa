"""The CPU demo world: a tiny tokenizer and Llama built in code, a synthetic
multi-step arithmetic task, and a short supervised warm start. No download.

    python toy.py prepare [--out runs/toy_data] [--seed 0]   # data + warm-started model (cached)
    python toy.py eval --model runs/toy_data/model            # held-out accuracy of any checkpoint

The model is a real LlamaForCausalLM (the code path Llama/Qwen checkpoints
take); the tokenizer is byte-level BPE with no merges, one token per byte, so
"\\n\\n" spans two tokens (the character-level case of METHOD.md section 1). The
model's vocabulary is padded past the tokenizer's, as Qwen's is, so the code
must never sample an id the tokenizer does not have. Everything is written with
save_pretrained and read back by the real from_pretrained loaders.

The task: "Compute 7+5-3+8." is solved one "\\n\\n"-separated step per
operation, "7+5=12\\n\\n12-3=9\\n\\n9+8=17\\n\\n\\boxed{17}", generated in code from a
seed. TASK: 2-4 operations, operands 1-9, every running value kept in 0-9 (so
the whole table is 90 one-digit facts a tiny char-level model can learn);
4,000 train, 200 held-out (eval) and 200 dev problems, distinct, shuffled,
disjoint.

The warm start (WARM: the default 64-hidden 2-layer Llama, AdamW, batch 64, on
1 thread) first trains on clean solutions for 600 steps, which teaches the
arithmetic (sampled accuracy ~0.97). Then it trains at 30% of that lr on
solutions in which every step independently slips with probability 0.45: its
result is off by +-1 or +-2 and the later steps carry on correctly from the
wrong value, so the final answer is off too (slips never cancel). After at
least 150 such steps (a habit learnt this long takes RL some 60 steps at the
demo's lr to remove; 25 steps at 2% lr made one that RL removed in 10), the
accuracy is measured every 25 steps on the dev split (200 problems x 4 samples
at temperature 0.7), and the warm start stops at the first check within
target +- band (0.35 +- 0.05). Stopping on a
measured accuracy, not a step count, is what makes the start the same on any
machine: float differences (threads, CPU kernels) compounded over a fixed
number of AdamW steps once gave 0.345 on one machine and 0.49 on another. The
policy knows the arithmetic but slips at identifiable steps, which step-level
credit assignment has to remove. settings.json records the step and the
accuracy it stopped at, and the held-out accuracy.
"""
import argparse
import json
import os
import random
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TASK = dict(min_ops=2, max_ops=4, max_operand=9, max_value=9, n_train=4000, n_eval=200, n_dev=200)
WARM = dict(hidden=64, layers=2, batch=64, lr=5e-3, clean_steps=600, p_slip=0.45, max_slip=2, slip_lr=0.3,
            slip_steps=150, target=0.35, band=0.05, check_every=25, check_samples=4, max_steps=3000, threads=1)
MAX_RESPONSE_TOKENS = 64  # a 4-operation solution, slips included, is under 50 tokens with EOS
VERSION = 2               # bump when the generator or the warm start changes meaning


def build_tokenizer(corpus: list[str] | None = None, merges: int = 0) -> PreTrainedTokenizerFast:
    """<|pad|> (id 0), <|eos|> (id 1), then one token per byte (ids 2-257), then
    `merges` BPE merges learnt from `corpus` (none by default: the toy world's
    tokenizer is character-level; the tests also use a merged one, where "\\n\\n"
    merges with its neighbours as in real BPE vocabularies)."""
    tok = Tokenizer(models.BPE())
    # with merges, GPT-2's split into words first, so merges stay inside words as in real vocabularies
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=merges > 0)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=258 + merges, special_tokens=["<|pad|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus if merges else [""], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0,
                max_positions: int = 2048) -> LlamaForCausalLM:
    """A random-init Llama whose embedding has 16 unused rows past the vocabulary."""
    import torch
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 16, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------
# The task

def make_problem(rng: random.Random, min_ops=2, max_ops=4, max_operand=9, max_value=9, **_) -> list[int]:
    """[start, d1, d2, ...]: a start in 1..max_operand, then nonzero signed
    operands, each keeping the running value in 0..max_value."""
    terms = [rng.randint(1, max_operand)]
    for _ in range(rng.randint(min_ops, max_ops)):
        v = sum(terms)
        ds = [d for d in range(-max_operand, max_operand + 1) if d and 0 <= v + d <= max_value]
        terms.append(rng.choice(ds))
    return terms


def question(terms: list[int]) -> str:
    return "Compute " + str(terms[0]) + "".join(f"{d:+d}" for d in terms[1:]) + "."


def solution(terms: list[int], slips: dict[int, int] | None = None) -> str:
    """One step per operation, then the boxed answer. Step k (0-based) in
    `slips` writes its result off by slips[k]; later steps start from there."""
    v, steps, slips = terms[0], [], slips or {}
    for k, d in enumerate(terms[1:]):
        new = v + d + slips.get(k, 0)
        steps.append(f"{v}{'+' if d > 0 else '-'}{abs(d)}={new}")
        v = new
    return "\n\n".join(steps + [f"\\boxed{{{v}}}"])


def corrupt(terms: list[int], rng: random.Random, p_slip: float, max_slip: int = 2) -> dict[int, int]:
    """{step: offset}: each step slips independently with probability p_slip by
    +-1..max_slip. Offsets never drive a running value below 0 (the format has
    no negative numbers) and never cancel earlier slips, so a solution with a
    slip always ends on a wrong answer."""
    slips, off = {}, 0  # off: how far the running value is from the truth
    for k in range(len(terms) - 1):
        if rng.random() < p_slip:
            lowest = min(sum(terms[:j + 1]) for j in range(k + 1, len(terms))) + off
            ok = [o for o in range(-max_slip, max_slip + 1) if o and o != -off and lowest + o >= 0]
            if ok:  # empty only when max_slip = 1 and the value sits at 0
                slips[k] = rng.choice(ok)
                off += slips[k]
    return slips


def make_splits(seed: int, n_train: int, n_eval: int, n_dev: int = 0, **task) -> tuple[list, list, list]:
    """n_train + n_eval + n_dev distinct problems (by question text) from the
    seed, shuffled, then split: train, eval (held out) and dev (the warm start's
    checks) are disjoint and alike."""
    rng, seen, out, n = random.Random(seed), set(), [], n_train + n_eval + n_dev
    for _ in range(100 * n):
        terms = make_problem(rng, **task)
        if question(terms) not in seen:
            seen.add(question(terms))
            out.append(terms)
            if len(out) == n:
                rng.shuffle(out)  # rarer short problems run out first: mix before splitting
                return out[n_eval + n_dev:], out[:n_eval], out[n_eval:n_eval + n_dev]
    raise ValueError(f"could not draw {n} distinct problems with {task}")


def rows(problems: list[list[int]]) -> list[dict]:
    return [{"question": question(t), "answer": str(sum(t))} for t in problems]


def prompt_ids(tok, q: str) -> list[int]:
    """What train.py feeds the policy under configs/toy.yaml (chat template on, prompt_template "{question}")."""
    from config import Config
    from data import encode_prompt
    return encode_prompt(tok, q, Config(prompt_template="{question}", chat_template=True))


# ----------------------------------------------------------------------------
# Warm start and evaluation

def warm_start(tok, train: list[list[int]], dev: list[dict], seed: int, hidden: int, layers: int, batch: int,
               lr: float, clean_steps: int, p_slip: float, max_slip: int, slip_lr: float, slip_steps: int, target: float,
               band: float, check_every: int, check_samples: int, max_steps: int, threads: int, log=print):
    """Supervised training on prompt + solution + EOS, loss on the response
    tokens only: clean solutions for clean_steps, then slipped ones (corrupt) at
    slip_lr x lr until the dev accuracy is within target +- band (module
    docstring). A fresh corruption is drawn every time a problem is seen, so the
    model learns a slip rate, not particular slips. Returns (model, step, dev accuracy)."""
    import torch
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = build_model(tok, hidden=hidden, layers=layers, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 30, 1.0) if s < clean_steps else slip_lr)
    rng, eos, pad = random.Random(seed + 1), tok.eos_token_id, tok.pad_token_id
    prompts, acc = {}, None
    try:
        for step in range(1, max_steps + 1):
            seqs, rate = [], p_slip if step > clean_steps else 0.0
            for terms in rng.sample(train, batch):
                q = question(terms)
                p = prompts.get(q) or prompts.setdefault(q, prompt_ids(tok, q))
                r = tok(solution(terms, corrupt(terms, rng, rate, max_slip)), add_special_tokens=False)["input_ids"]
                seqs.append((p, r + [eos]))
            width = max(len(p) + len(r) for p, r in seqs)
            ids, labels = torch.full((batch, width), pad), torch.full((batch, width), -100)
            mask = torch.zeros_like(ids)
            for i, (p, r) in enumerate(seqs):  # right padding; labels only on the response
                ids[i, :len(p) + len(r)] = torch.tensor(p + r)
                mask[i, :len(p) + len(r)] = 1
                labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step >= clean_steps + slip_steps and (step - clean_steps) % check_every == 0:
                with torch.random.fork_rng():  # the check draws samples; training's stream is untouched
                    acc, _ = evaluate(model.eval(), tok, dev, samples=check_samples, seed=seed)
                model.train()
                if log:
                    log(f"  warm start step {step:4d}  loss {loss.item():.4f}  dev accuracy {acc:.3f}")
                if abs(acc - target) <= band:
                    return model.eval(), step, acc
            elif log and step % 100 == 0:
                log(f"  warm start step {step:4d}  loss {loss.item():.4f}")
    finally:
        torch.set_num_threads(old_threads)
    raise RuntimeError(f"the warm start did not reach dev accuracy {target} +- {band} in {max_steps} steps "
                       f"(last {acc}): the toy world's settings need a look")


def evaluate(model, tok, rows_: list[dict], temperature=0.7, samples=1, seed=0,
             max_response_tokens=MAX_RESPONSE_TOKENS, batch=256) -> tuple[float, list[str]]:
    """Mean reward (reward.score_batch) over `samples` draws per question at the
    demo's RL sampling settings (top_p 1, top_k 0); also the decoded responses."""
    import torch
    import reward
    import tree
    torch.manual_seed(seed)
    sampling = tree.Sampling(temperature=temperature, top_p=1.0, top_k=0, max_response_tokens=max_response_tokens)
    jobs = [r for r in rows_ for _ in range(samples)]
    texts = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        res = tree.generate_expander(model, tok, sampling, [prompt_ids(tok, r["question"]) for r in chunk],
                                     [max_response_tokens] * len(chunk))
        texts += tok.batch_decode([ids for ids, _ in res], skip_special_tokens=True)
    rewards, _ = reward.score_batch(texts, [r["answer"] for r in jobs])
    return sum(rewards) / len(rewards), texts


# ----------------------------------------------------------------------------
# prepare: data + warm-started model, cached on disk

def _write_jsonl(path: str, rows_: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows_)


def prepare(out_dir: str = "runs/toy_data", seed: int = 0, task: dict | None = None, warm: dict | None = None,
            measure: bool = True, log=print) -> dict:
    """Write out_dir/{model/, train.jsonl, eval.jsonl, settings.json}; skip the
    work when settings.json records the same settings (it is written last, so
    an interrupted run starts over). Returns the settings and the results."""
    import torch
    log = log or (lambda *_: None)
    settings = {"version": VERSION, "seed": seed, "task": {**TASK, **(task or {})}, "warm": {**WARM, **(warm or {})}}
    stamp = os.path.join(out_dir, "settings.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            old = json.load(f)
        if old["settings"] == settings and os.path.isfile(os.path.join(out_dir, "model", "config.json")):
            log(f"{out_dir}: up to date (cached), nothing to do")
            return {**old, "cached": True}
        os.remove(stamp)  # so an interrupted run can never pass for a finished one
    os.makedirs(out_dir, exist_ok=True)
    train, held_out, dev = make_splits(seed, **settings["task"])
    _write_jsonl(os.path.join(out_dir, "train.jsonl"), rows(train))
    _write_jsonl(os.path.join(out_dir, "eval.jsonl"), rows(held_out))
    log(f"wrote {len(train)} train and {len(held_out)} held-out problems to {out_dir}")
    tok, t0 = build_tokenizer(), time.time()
    model, step, dev_acc = warm_start(tok, train, rows(dev), seed, **settings["warm"], log=log)
    results = {"warm_start_s": round(time.time() - t0, 1), "warm_start_steps": step, "dev_accuracy": dev_acc}
    model.save_pretrained(os.path.join(out_dir, "model"))
    tok.save_pretrained(os.path.join(out_dir, "model"))
    log(f"warm start: stopped at step {step} with dev accuracy {dev_acc:.3f} (target {settings['warm']['target']}"
        f" +- {settings['warm']['band']}), {results['warm_start_s']} s; model + tokenizer in {out_dir}/model")
    if measure:
        acc, texts = evaluate(model, tok, rows(held_out), seed=seed)
        results["eval_accuracy"] = acc
        log(f"held-out accuracy at temperature 0.7: {acc:.3f} over {len(held_out)} problems; a sample:\n"
            f"{question(held_out[0])}\n{texts[0]}")
    with open(stamp, "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=1)
    return {"settings": settings, "results": results, "cached": False}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("prepare", help="write the data and the warm-started model (cached)")
    p.add_argument("--out", default="runs/toy_data")
    p.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval", help="held-out accuracy of a saved model")
    e.add_argument("--model", default="runs/toy_data/model")
    e.add_argument("--data", default="runs/toy_data/eval.jsonl")
    e.add_argument("--samples", type=int, default=1, help="samples per question")
    e.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args(argv)
    if args.cmd == "eval":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        with open(args.data) as f:
            data = [json.loads(line) for line in f]
        acc, _ = evaluate(model, tok, data, temperature=args.temperature, samples=args.samples)
        print(f"{args.model}: accuracy {acc:.3f} on {len(data)} x {args.samples} samples of {args.data}")
        return
    out = prepare(getattr(args, "out", "runs/toy_data"), getattr(args, "seed", 0))
    if out["cached"]:
        r = out["results"]
        print(f"warm start: stopped at step {r['warm_start_steps']} with dev accuracy {r['dev_accuracy']:.3f}; "
              f"held-out accuracy {r.get('eval_accuracy', float('nan')):.3f} (recorded in settings.json)")
    if args.cmd is None:
        print("next: python train.py configs/toy.yaml")


if __name__ == "__main__":
    main()
