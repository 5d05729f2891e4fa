"""train.py end to end on the tiny model: in-process, under torchrun (2 ranks,
gloo, FSDP2), save and resume, eval-only, bad config and bad data."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from config import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
KEYS = ("step reward_mean eff_rate avg_rate ib_score ib_exploration ib_exploitation cov_eta entropy "
        "gen_tokens trajectories kl clip_frac grad_norm lr time_rollout time_train").split()


def run(tiny_dir, math_jsonl, run_dir, *extra):
    return train.main([CFG, f"model={tiny_dir}", f"data={math_jsonl}", f"run_dir={run_dir}", *extra])


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("rollout_engine", ["decoder", "lockstep"])
def test_two_steps_in_process(tiny_dir, math_jsonl, tmp_path, rollout_engine):
    out = tmp_path / "run"
    last = run(tiny_dir, math_jsonl, out, f"eval_sets=[{math_jsonl}]", f"rollout_engine={rollout_engine}")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]  # eval before training, then one line per step
    assert "eval/math" in rows[0] and "eval/math" in rows[2]
    for r in rows[1:]:
        assert set(KEYS) <= set(r)
        assert r["trajectories"] == 2 * 4  # questions_per_step x G, G = B0 + (L-1)*K*B = 2 + 2
        assert 0 < r["gen_tokens"] <= 8 * 24 and all(math_ok(r[k]) for k in KEYS)
    assert rows[1]["kl"] == 0.0 and rows[2]["kl"] > 0  # the reference equals the policy at step 1 only
    assert last == rows[-1]
    with open(out / "config.yaml") as f:
        assert "max_response_tokens: 24" in f.read()
    # a Hugging Face checkpoint that from_pretrained loads, with the trained weights
    hf = out / "checkpoints" / "step_000002" / "hf"
    trained, initial = weights(hf), weights(tiny_dir)
    assert max((trained[k] - initial[k]).abs().max() for k in initial) > 0
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(hf)("ab")["input_ids"] == AutoTokenizer.from_pretrained(tiny_dir)("ab")["input_ids"]
    assert (out / "trees.txt").read_text().startswith("question:")
    assert len((out / "trees.jsonl").read_text().splitlines()) == 2  # this rank's trees of the last step
    assert (out / "trees.png").exists() and (out / "metrics.png").exists()


def math_ok(v):
    return v == v and abs(v) != float("inf")  # not NaN, not inf


def test_resume_continues_with_the_same_next_batch(tiny_dir, math_jsonl, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny_dir, math_jsonl, a, "steps=3")
    run(tiny_dir, math_jsonl, b, "steps=1")    # stops (and saves) after one step
    run(tiny_dir, math_jsonl, b, "steps=3")    # resumes at step 1
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]
    assert strip(metrics(a)) == strip(metrics(b))
    wa, wb = weights(a / "checkpoints/step_000003/hf"), weights(b / "checkpoints/step_000003/hf")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_save_keeps_the_previous_checkpoint(tiny_dir, math_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(tiny_dir, math_jsonl, out, "steps=1")
    import torch.distributed.checkpoint as dcp

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed half-way through a save")
    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, math_jsonl, out, "steps=2")
    monkeypatch.undo()
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000001"
    assert (ckpts / "step_000001" / "meta.json").exists()
    weights(ckpts / "step_000001" / "hf")  # still loads
    run(tiny_dir, math_jsonl, out, "steps=2")  # and the run resumes from it
    assert (ckpts / "latest").read_text() == "step_000002"
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_eval_only(tiny_dir, math_jsonl, tmp_path):
    res = run(tiny_dir, math_jsonl, tmp_path / "ev", "eval_only=true", f"eval_sets=[{math_jsonl}]", "eval_k=3")
    assert set(res) == {"eval/math"} and 0.0 <= res["eval/math"] <= 1.0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text()) == res
    assert not (tmp_path / "ev" / "checkpoints").exists()


@pytest.mark.parametrize("extra, words", [
    (["bogus=1"], "unknown key 'bogus'"),
    (["lamda=0.1"], "unknown key 'lamda'; did you mean 'lam'?"),
    (["B0=two"], "B0 must be int"),
    (["strategy=best"], "strategy must be one of"),
    (["rollout_engine=vllm"], "rollout_engine must be decoder or lockstep"),
    (["max_rows=0"], "max_rows must be >= 1"),
    (["lr=1e3"], "lr must be in (0, 1)"),
    (["resume=maybe"], "resume must be true, false or force"),
    (["data=/nonexistent/q.jsonl"], "/nonexistent/q.jsonl"),
    (["question_field=query"], "no question field 'query'"),
    (["model=/nonexistent_model"], "/nonexistent_model"),
])
def test_bad_config_and_data_fail_clearly(tiny_dir, math_jsonl, tmp_path, extra, words):
    with pytest.raises(UserError) as e:
        run(tiny_dir, math_jsonl, tmp_path / "bad", *extra)
    assert words in str(e.value)
    assert not (tmp_path / "bad" / "config.yaml").exists()  # nothing written for a run that never started


def test_floats_in_exponent_form(tmp_path):
    """lr=1e-6 on the command line or lr: 1e-6 in a file (YAML 1.1 reads both as strings)."""
    from config import load_config
    f = tmp_path / "c.yaml"
    f.write_text("model: m\ndata: d\nlr: 3e-6\n")
    assert load_config(str(f)).lr == 3e-6
    cfg = load_config(str(f), ["lr=1e-6", "kl_coef=2E-3", "beta=5"])
    assert (cfg.lr, cfg.kl_coef, cfg.beta) == (1e-6, 2e-3, 5.0) and isinstance(cfg.beta, float)
    with pytest.raises(UserError, match="lr must be float, got str 'fast'"):
        load_config(str(f), ["lr=fast"])


def test_gpu_check_train_command_is_a_valid_config(tiny_dir, math_jsonl):
    """gpu_check.sh runs once on a lent GPU, if ever: its train.py overrides must
    load here (its lr=1e-6 once did not). The model and data it writes on the
    GPU machine are swapped for the tests' own."""
    import shlex
    from config import load_config
    text = open(os.path.join(ROOT, "gpu_check.sh")).read().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if " train.py " in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    args = shlex.split(lines[0])
    args = args[args.index("train.py") + 1:]
    swap = {"model": f"model={tiny_dir}", "data": f"data={math_jsonl}"}
    cfg = load_config(os.path.join(ROOT, args[0]), [swap.get(a.split("=")[0], a) for a in args[1:]])
    assert (cfg.lr, cfg.dtype, cfg.steps, cfg.L) == (1e-6, "bfloat16", 3, 9)


def test_missing_config_file_and_bad_rows(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="nope.yaml"):
        train.main([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": 3, "answer": "1"}) + "\n")
    with pytest.raises(UserError, match="row 1: question holds int 3, not text"):
        train.main([CFG, f"model={tiny_dir}", f"data={bad}", f"run_dir={tmp_path / 'r'}"])


def test_torchrun_two_ranks_fsdp2(tiny_dir, math_jsonl, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # set by the in-process tests' single-rank group
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), CFG, f"model={tiny_dir}", f"data={math_jsonl}",
           f"run_dir={out}", "questions_per_step=4", f"eval_sets=[{math_jsonl}]"]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["trajectories"] == 4 * 4  # both ranks' trees are counted: 2 questions each
        assert set(KEYS) <= set(r)
    # both ranks wrote their shard of the resumable state, and rank 0 the gathered model
    state = os.listdir(out / "checkpoints/step_000002/state")
    assert sum(f.endswith(".distcp") for f in state) == 2
    assert os.path.exists(out / "checkpoints/step_000002/rng_1.pt")
    trained, initial = weights(out / "checkpoints/step_000002/hf"), weights(tiny_dir)
    assert set(trained) == set(initial)
    assert all(trained[k].shape == initial[k].shape for k in initial)


def test_rollout_gathers_weights_once_not_per_token(tiny_dir, monkeypatch):
    """Under FSDP2 a plain generate all-gathers every unit for every decoded
    token; inside train.gathered the weights are gathered once per phase."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fpg
    from config import load_config
    import engine
    import tree
    from transformers import AutoTokenizer
    train.setup_distributed()
    cfg = load_config(CFG, [f"model={tiny_dir}", "data=x"])
    model = train.load_model(tiny_dir, cfg, torch.device("cpu"), trainable=True)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    calls = []
    real = fpg.FSDPParamGroup.unshard

    def counting_unshard(group, *args, **kwargs):  # counts the unshards that gather (all-gather on > 1 rank)
        if not group.is_unsharded and group._all_gather_result is None:
            calls.append(1)
        return real(group, *args, **kwargs)
    monkeypatch.setattr(fpg.FSDPParamGroup, "unshard", counting_unshard)
    sampling = tree.Sampling(temperature=1.0, top_p=1.0, top_k=0)
    prefix = [tok("Compute 1+2.")["input_ids"]]
    units = 1 + model.config.num_hidden_layers  # one FSDP unit per decoder layer, plus the root
    tree.generate_expander(model, tok, sampling, prefix, [12])
    per_token = len(calls)
    assert per_token >= 10 * (units - 1)  # the decoder layers reshard after every forward
    calls.clear()
    with train.gathered(model):
        at_start = len(calls)
        tree.generate_expander(model, tok, sampling, prefix, [12])
        tree.generate_expander(model, tok, sampling, prefix, [12])
        decoder = engine.Decoder(model, tok, sampling, max_rows=2)
        for i in range(3):
            decoder.submit(i, prefix[0], 12)
        while decoder.busy():
            decoder.step()
        assert len(calls) == at_start  # nothing gathered while decoding, with either engine
    assert 1 <= at_start <= units  # once per unit (the root may still hold its weights)
    calls.clear()
    tree.generate_expander(model, tok, sampling, prefix, [12])
    assert len(calls) >= 10 * (units - 1)  # resharded again after the phase


def _spy_ratios(monkeypatch):
    """Per policy_loss call: max |logp - logp_old| on response tokens, and the number
    of optimizer steps taken before it."""
    import ibtpo
    calls, steps = [], [0]
    real_loss, real_step = ibtpo.policy_loss, torch.optim.AdamW.step

    def loss(logp, old, adv, mask, *args, **kwargs):
        calls.append((steps[0], float((logp.detach() - old)[mask.bool()].abs().max())))
        return real_loss(logp, old, adv, mask, *args, **kwargs)

    def step(self, *args, **kwargs):
        steps[0] += 1
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(ibtpo, "policy_loss", loss)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


def test_later_minibatches_are_weighed_against_the_sampling_policy(tiny_dir, math_jsonl, tmp_path, monkeypatch):
    """updates_per_batch = 2: the second mini-batch comes after an optimizer step, so its
    ratio against the policy that sampled it is not 1, and a high lr gets clipped."""
    calls = _spy_ratios(monkeypatch)
    last = run(tiny_dir, math_jsonl, tmp_path / "u2", "steps=1", "updates_per_batch=2", "lr=0.05")
    first = [r for s, r in calls if s == 0]
    second = [r for s, r in calls if s == 1]
    assert first and second and len(first) + len(second) == len(calls)
    assert max(first) < 1e-4     # the same weights as the pre-pass: ratio 1 up to rounding
    assert max(second) > 1e-2    # one optimizer step later
    assert last["clip_frac"] > 0


def test_one_update_per_batch_is_on_policy_with_no_extra_forward(tiny_dir, math_jsonl, tmp_path, monkeypatch):
    import ibtpo
    calls = _spy_ratios(monkeypatch)
    forwards, real = [], ibtpo.token_logprobs
    monkeypatch.setattr(ibtpo, "token_logprobs", lambda *a, **k: forwards.append(1) or real(*a, **k))
    last = run(tiny_dir, math_jsonl, tmp_path / "u1", "steps=1", "lr=0.05")
    assert calls and all(r == 0.0 for _, r in calls)
    assert len(forwards) == 2 * len(calls)  # the policy and the reference, once per micro-batch
    assert last["clip_frac"] == 0.0


def test_logged_lr_is_the_one_the_step_used(tiny_dir, math_jsonl, tmp_path):
    run(tiny_dir, math_jsonl, tmp_path / "lr", "lr=0.004", "warmup_steps=4")
    assert [r["lr"] for r in metrics(tmp_path / "lr")] == [0.001, 0.002]  # (s + 1) / 4 of lr at step s


def test_run_keys_reach_the_code_that_uses_them(tiny_dir, math_jsonl, tmp_path, monkeypatch):
    """sqrt_leaves reaches compute_advantages, verifier_timeout the verifier."""
    import ibtpo
    import reward
    seen = {"sqrt": set(), "timeout": set()}
    real_adv, real_score = ibtpo.compute_advantages, reward.score_batch

    def adv(tree, beta, lam, mode="mean", sqrt_leaves=False):
        seen["sqrt"].add(sqrt_leaves)
        return real_adv(tree, beta, lam, mode, sqrt_leaves)

    def score(texts, answers, timeout=reward.TIMEOUT):
        seen["timeout"].add(timeout)
        return real_score(texts, answers, timeout)
    monkeypatch.setattr(ibtpo, "compute_advantages", adv)
    monkeypatch.setattr(reward, "score_batch", score)
    run(tiny_dir, math_jsonl, tmp_path / "keys", "steps=1", "sqrt_leaves=true", "verifier_timeout=7.5",
        f"eval_sets=[{math_jsonl}]")
    assert seen == {"sqrt": {True}, "timeout": {7.5}}


@pytest.mark.parametrize("override, words", [
    ("prompt_template='{question} in \\boxed{}'", "write literal braces as {{ }}"),
    ("eps_low=-0.5", "eps_low must be in [0, 1)"),
    ("eps_high=1.5", "eps_high must be in [0, 1)"),
    ("lr=inf", "lr must be a finite number"),
    ("temperature=.nan", "temperature must be a finite number"),
    ("lam=inf", "lam must be a finite number"),
    ("lam=-0.1", "lam must be >= 0"),
    ("verifier_timeout=0", "verifier_timeout must be > 0"),
])
def test_config_values_are_checked_at_load(override, words):
    from config import load_config
    with pytest.raises(UserError) as e:
        load_config(CFG, ["model=m", "data=d", override])
    assert words in str(e.value)
