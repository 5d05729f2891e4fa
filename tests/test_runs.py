"""Runs that lose nothing: starting afresh or resuming in a run_dir, the metrics file,
SIGTERM, unwritable checkpoints, divergence, and one-line errors for bad files."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train
from config import UserError
from test_train import CFG, ROOT, metrics, run, weights

STRIP = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def files(folder):
    """{relative path: bytes} of everything under folder."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


# ---------------------------------------------------------------- fresh start or resume

def test_a_fresh_start_in_a_run_dir_with_checkpoints_is_refused(tiny_dir, math_jsonl, tmp_path):
    out = tmp_path / "run"
    run(tiny_dir, math_jsonl, out, "steps=4")
    before = files(out)
    with pytest.raises(UserError, match="already holds a run .*step_000004.*resume=true continues it"):
        run(tiny_dir, math_jsonl, out, "resume=false", "keep_checkpoints=1", "steps=2")
    assert files(out) == before  # checkpoints, latest, metrics and config untouched
    os.remove(out / "checkpoints" / "latest")  # a lost `latest` still protects the run
    with pytest.raises(UserError, match="already holds a run"):
        run(tiny_dir, math_jsonl, out, "resume=false", "steps=2")
    assert run(tiny_dir, math_jsonl, out, "steps=4")["step"] == 4  # and resumes from the newest checkpoint


def test_retention_counts_steps_and_never_deletes_the_new_or_a_newer_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4, 999999, 1000000):
        (root / f"step_{s:06d}").mkdir(parents=True)
        (root / f"step_{s:06d}" / "meta.json").write_text(json.dumps({"step": s}))
    checkpoint.prune(str(tmp_path), 3, keep=2)  # step 3 just written; 4 and up are not this run's to judge
    assert sorted(os.listdir(root)) == ["step_000002", "step_000003", "step_000004", "step_1000000", "step_999999"]
    checkpoint.prune(str(tmp_path), 1000000, keep=2)  # by number: 999999 is the newest older one
    assert sorted(os.listdir(root)) == ["step_1000000", "step_999999"]


def test_relaunching_says_what_it_does_and_refuses_a_changed_config(tiny_dir, math_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_dir, math_jsonl, out)
    assert f"fresh run in {out}: steps 1-2" in capsys.readouterr().out
    run(tiny_dir, math_jsonl, out)  # the same command again: nothing to do, nothing changed
    assert f"resuming from step 2 of {out}: already at step 2 of steps=2" in capsys.readouterr().out
    saved = (out / "config.yaml").read_text()
    for change in ("seed=1", "B0=3"):
        with pytest.raises(UserError, match=f"trained to step 2 with other settings \\({change.split('=')[0]}: "):
            run(tiny_dir, math_jsonl, out, change)
        assert (out / "config.yaml").read_text() == saved
    run(tiny_dir, math_jsonl, out, "steps=3")  # how long a run is may change
    assert f"resuming from step 2 of {out}: steps 3-3" in capsys.readouterr().out
    run(tiny_dir, math_jsonl, out, "steps=4", "seed=1", "resume=force")
    assert "resume=force: changed seed" in capsys.readouterr().out
    assert "seed: 0" in (out / "config.until_step_000003.yaml").read_text()
    assert "seed: 1" in (out / "config.yaml").read_text()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_eval_only_writes_its_own_files(tiny_dir, math_jsonl, tmp_path):
    out = tmp_path / "run"
    run(tiny_dir, math_jsonl, out)
    before = files(out)
    res = run(tiny_dir, math_jsonl, out, "eval_only=true", f"eval_sets=[{math_jsonl}]")
    after = files(out)
    assert json.loads(after.pop("eval.json")) == res and "eval_only: true" in after.pop("eval_config.yaml").decode()
    assert after == before
    with pytest.raises(UserError, match="eval_only=true needs eval_sets"):
        run(tiny_dir, math_jsonl, tmp_path / "ev", "eval_only=true")


def test_nothing_to_train_is_an_error(tiny_dir, math_jsonl, tmp_path):
    with pytest.raises(UserError, match=r"nothing to train: steps=0 means one epoch, and the 5 questions .* fewer "
                                        r"than questions_per_step=8"):  # 6 rows, one prompt over 128 tokens
        run(tiny_dir, math_jsonl, tmp_path / "r", "steps=0", "questions_per_step=8")


# ---------------------------------------------------------------- the metrics file

def test_a_half_written_metrics_line_is_dropped_and_the_rest_kept(tiny_dir, math_jsonl, tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "run"
    run(tiny_dir, math_jsonl, ref, "steps=2")
    run(tiny_dir, math_jsonl, out, "steps=1")
    with open(out / "metrics.jsonl", "a") as f:  # the disk filled during the next write
        f.write(json.dumps({"step": 2, "reward_mean": 0.5, "note": "x" * 300})[:309])
    run(tiny_dir, math_jsonl, out, "steps=2")
    assert f"warning: {out / 'metrics.jsonl'}: dropped a half-written last line (309 bytes)" in capsys.readouterr().out
    assert STRIP(metrics(out)) == STRIP(metrics(ref))


def test_a_corrupt_metrics_line_stops_the_restart_and_changes_nothing(tiny_dir, math_jsonl, tmp_path):
    out = tmp_path / "run"
    run(tiny_dir, math_jsonl, out, "steps=2")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0][:50] + "\n" + lines[1] + "\n")
    before = files(out)
    with pytest.raises(UserError, match=f"{out / 'metrics.jsonl'}: line 1 is not a metrics row"):
        run(tiny_dir, math_jsonl, out, "steps=3")
    assert files(out) == before


# ---------------------------------------------------------------- SIGTERM

def _train_process(tiny_dir, math_jsonl, run_dir, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), CFG, f"model={tiny_dir}",
                             f"data={math_jsonl}", f"run_dir={run_dir}", "steps=6", *extra],
                            cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_the_step_and_a_resume_loses_nothing(tiny_dir, math_jsonl, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    p = _train_process(tiny_dir, math_jsonl, ref)
    assert p.wait(300) == 0, p.stderr.read()[-2000:]
    p = _train_process(tiny_dir, math_jsonl, out)
    while not (os.path.isfile(out / "metrics.jsonl") and (out / "metrics.jsonl").read_text().count("\n") >= 1):
        assert p.poll() is None, p.stderr.read()[-2000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)  # step 1 is logged: the run is inside step 2
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    saved = checkpoint.find_checkpoint(str(out))
    assert saved is not None and 2 <= saved[0] < 6
    assert f"stopped by SIGTERM after step {saved[0]}; saved {saved[1]}" in err
    assert [r["step"] for r in metrics(out)] == list(range(1, saved[0] + 1))
    p = _train_process(tiny_dir, math_jsonl, out)
    assert p.wait(300) == 0, p.stderr.read()[-2000:]
    assert STRIP(metrics(out)) == STRIP(metrics(ref))
    wa, wb = weights(ref / "checkpoints/step_000006/hf"), weights(out / "checkpoints/step_000006/hf")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- unwritable checkpoints

def test_an_unwritable_checkpoint_folder_fails_before_training(tiny_dir, math_jsonl, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(UserError, match="checkpoints is not writable"):
        run(tiny_dir, math_jsonl, out)
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_a_failed_save_keeps_the_previous_checkpoint_and_stops(tiny_dir, math_jsonl, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    out = tmp_path / "run"
    real, calls = dcp.save, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "checkpoints"))
        return real(*args, **kwargs)
    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(UserError) as e:
        run(tiny_dir, math_jsonl, out, "save_every=1", "steps=3")
    step1 = out / "checkpoints" / "step_000001"
    assert f"could not write checkpoint {out / 'checkpoints' / 'step_000002'}" in str(e.value)
    assert "No space left on device" in str(e.value) and f"the previous checkpoint, {step1}, is kept" in str(e.value)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_000001"]
    assert (out / "checkpoints" / "latest").read_text() == "step_000001"
    monkeypatch.undo()
    run(tiny_dir, math_jsonl, out, "save_every=1", "steps=3")  # the disk has room again
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


# ---------------------------------------------------------------- divergence

def _nan_loss(monkeypatch, when):
    import ibtpo
    real, calls = ibtpo.policy_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        out, stats = real(*args, **kwargs)
        return (out * float("nan"), stats) if when(calls[0]) else (out, stats)
    monkeypatch.setattr(ibtpo, "policy_loss", loss)


def test_a_non_finite_update_is_skipped_and_counted(tiny_dir, math_jsonl, tmp_path, monkeypatch, capsys):
    _nan_loss(monkeypatch, lambda call: call == 1)
    out = tmp_path / "run"
    run(tiny_dir, math_jsonl, out, "steps=2", "save_every=1", "micro_batch_tokens=100000")
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == [1, 0]
    assert "step 1: skipped 1 optimizer update(s)" in capsys.readouterr().err
    w0, w1 = weights(tiny_dir), weights(out / "checkpoints/step_000001/hf")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # no weight moved
    w2 = weights(out / "checkpoints/step_000002/hf")
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)


def test_updates_that_keep_failing_stop_the_run_without_a_checkpoint(tiny_dir, math_jsonl, tmp_path, monkeypatch):
    _nan_loss(monkeypatch, lambda call: True)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="training diverged: 3 optimizer updates in a row .*step 3.*lower lr"):
        run(tiny_dir, math_jsonl, out, "steps=5", "save_every=10")
    assert [r["skipped_steps"] for r in metrics(out)] == [1, 1, 1]
    assert checkpoint.complete_checkpoints(str(out)) == []


def test_non_finite_weights_are_never_checkpointed(tiny_dir, math_jsonl, tmp_path, monkeypatch):
    real = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        real(self, *args, **kwargs)
        with torch.no_grad():
            p = self.param_groups[0]["params"][0]
            getattr(p, "to_local", lambda: p)().fill_(float("nan"))
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="step 1 are not finite: no checkpoint written"):
        run(tiny_dir, math_jsonl, out, "steps=2", "save_every=1")
    assert checkpoint.complete_checkpoints(str(out)) == [] and not os.path.exists(out / "checkpoints" / "latest")


def test_nan_rollout_logprobs_are_named_before_the_ib_score(tiny_dir, math_jsonl, tmp_path, monkeypatch):
    import engine
    real = engine.sample
    monkeypatch.setattr(engine, "sample", lambda *a: (real(*a)[0], real(*a)[1] * float("nan")))
    with pytest.raises(UserError, match="step 1: the policy produced NaN log-probs in the rollout"):
        run(tiny_dir, math_jsonl, tmp_path / "run")


# ---------------------------------------------------------------- bad files

def _jsonl(tmp_path, content: bytes):
    path = tmp_path / "q.jsonl"
    path.write_bytes(content)
    return str(path)


GOOD = json.dumps({"question": "What is 1 + 1?", "answer": "2"}).encode() + b"\n"


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b"\n\n  \n", "holds only blank lines"),
    (GOOD + b'{"question": "caf\xe9", "answer": "1"}\n', "line 2 is not UTF-8 text (byte 0xe9)"),
    (GOOD + GOOD[:25] + b"\n" + GOOD, "line 2 is not valid JSON"),
    (GOOD + b"[1, 2]\n", "line 2 is not a JSON object"),
    (GOOD + json.dumps({"question": [], "answer": "1"}).encode() + b"\n", "row 2: question is a chat with no message"),
    (GOOD + json.dumps({"question": "q", "answer": None}).encode() + b"\n", "row 2: answer is empty (null)"),
], ids=["empty", "blank", "utf8", "truncated", "not-object", "empty-chat", "null-answer"])
def test_bad_data_files_are_one_line_naming_file_and_row(tiny_dir, tmp_path, content, words):
    data = _jsonl(tmp_path, content)
    with pytest.raises(UserError) as e:
        train.main([CFG, f"model={tiny_dir}", f"data={data}", f"run_dir={tmp_path / 'r'}"])
    assert data in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_a_binary_config_file_is_named(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(UserError, match=f"config file {cfg} is not text"):
        train.main([str(cfg)])


def test_golds_the_verifier_cannot_score_are_reported_and_dropped(tiny_dir, tmp_path, capsys):
    rows = [{"question": f"q{i}", "answer": a} for i, a in enumerate(["1", "", "N/A", "2", "3", "\\frac{1}{"])]
    data = _jsonl(tmp_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    run(tiny_dir, data, tmp_path / "r", "steps=1")
    out = capsys.readouterr().out
    assert "4 questions" not in out and "3 dropped whose gold answer the verifier cannot score " \
        "(row 2: '', row 3: 'N/A', row 6: '\\\\frac{1}{')" in out


def test_a_corrupt_latest_names_the_newest_complete_checkpoint(tiny_dir, math_jsonl, tmp_path):
    out = tmp_path / "run"
    run(tiny_dir, math_jsonl, out, "steps=1")
    (out / "checkpoints" / "latest").write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(UserError, match="latest is corrupt .* the newest complete checkpoint is .*step_000001"):
        run(tiny_dir, math_jsonl, out, "steps=2")


def test_a_truncated_checkpoint_names_the_previous_one(tiny_dir, math_jsonl, tmp_path):
    out = tmp_path / "run"
    run(tiny_dir, math_jsonl, out, "steps=2", "save_every=1")
    state = out / "checkpoints" / "step_000002" / "state"
    shard = next(p for p in state.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="step_000002 is incomplete or corrupt .*the previous complete one is "
                                        ".*step_000001: delete .*step_000002 to resume from it"):
        run(tiny_dir, math_jsonl, out, "steps=3", "save_every=1")
    import shutil
    shutil.rmtree(out / "checkpoints" / "step_000002")
    run(tiny_dir, math_jsonl, out, "steps=3", "save_every=1")  # `latest` names a checkpoint that is gone
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_missing_local_paths_and_unreachable_hub_ids_say_where_they_looked(tiny_dir, math_jsonl, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="model 'runs/nope_model' not found \\(looked up as a local path"):
        run(tiny_dir, math_jsonl, tmp_path / "r", "model=runs/nope_model")
    with pytest.raises(UserError, match="model 'nobody/no-such-model': could not load it \\(not a local path, "
                                        "so a hub id, and the hub lookup failed \\(HF_HUB_OFFLINE is set\\)"):
        run(tiny_dir, math_jsonl, tmp_path / "r", "model=nobody/no-such-model")
    with pytest.raises(UserError, match="data 'nobody/no-such-data': could not load it "
                                        "\\(not a local path, so a hub id"):
        run(tiny_dir, math_jsonl, tmp_path / "r", "data=nobody/no-such-data")


# ---------------------------------------------------------------- the command line

def test_a_user_error_is_one_line_without_a_traceback(tiny_dir, math_jsonl, tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), CFG, f"model={tiny_dir}",
                        f"data={math_jsonl}", f"run_dir={tmp_path / 'r'}", "lamda=0.1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == \
        "error: config: unknown key 'lamda'; did you mean 'lam'? (the keys and their meaning: config.py)"
    assert "Traceback" not in p.stderr


def test_under_torchrun_one_rank_prints_the_error(tiny_dir, math_jsonl, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), CFG, f"model={tiny_dir}", f"data={math_jsonl}",
                        f"run_dir={tmp_path / 'r'}", "questions_per_step=3"],
                       cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert (p.stdout + p.stderr).count("error: config: questions_per_step (3) must be a multiple") == 1
