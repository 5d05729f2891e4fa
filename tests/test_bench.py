"""The benches' arithmetic: the t interval over seeds, the accuracy read at a token
budget, and the memory per GPU of a recipe (the long benches themselves are
benchmarks, not tests)."""
import math

import pytest

import bench


def test_t_interval_by_hand():
    # mean 2.5, s = sqrt(5/3), t(0.975, 3 df) = 3.182: half-width 3.182 * 1.290994 / 2 = 2.053972
    m, lo, hi = bench.t_interval([1.0, 2.0, 3.0, 4.0])
    assert (m, lo, hi) == pytest.approx((2.5, 0.446028, 4.553972), abs=1e-6)
    m, lo, hi = bench.t_interval([0.1] * 8)  # no spread, no width
    assert lo == hi == pytest.approx(0.1)
    # 8 seeds: t(0.975, 7 df) = 2.365
    values = [0.02, -0.01, 0.05, 0.03, 0.0, 0.04, 0.01, 0.02]
    m, lo, hi = bench.t_interval(values)
    s = math.sqrt(sum((v - 0.02) ** 2 for v in values) / 7)
    assert m == pytest.approx(0.02) and hi - m == pytest.approx(2.365 * s / math.sqrt(8))
    assert math.isnan(bench.t_interval([0.3])[1])


def test_accuracy_at_a_token_budget_is_read_between_evaluations():
    curve = [(0, 0.3), (100, 0.5), (200, 0.9)]
    assert bench.at_tokens(curve, 150) == pytest.approx(0.7)
    assert bench.at_tokens(curve, 100) == pytest.approx(0.5)
    assert bench.at_tokens(curve, 0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="outside the curve"):
        bench.at_tokens(curve, 250)


# ----------------------------------------------------------------------------
# Memory per GPU (bench.py memory): the arithmetic, and every shipped recipe fits

def test_memory_estimate_by_hand():
    from types import SimpleNamespace

    from config import Config
    conf = SimpleNamespace(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=1000)
    cfg = Config(model="m", data="d", dtype="bfloat16", questions_per_step=16, B0=4, L=9, K=1, B=1,
                 max_prompt_tokens=100, max_response_tokens=400, max_rows=24, kl_coef=0.001,
                 micro_batch_tokens=1000, grad_checkpointing=True, eval_sets=["e"])
    terms, peaks = bench.memory_estimate(cfg, n_params=10_000, conf=conf, gpus=8)
    kv = 2 * 2 * 2 * 16 * 2  # K and V x layers x KV heads x head_dim x bf16 bytes = 256 B per token
    v = list(terms.values())
    # 2 questions per GPU: round 0 has 8 rows of 500 tokens; 2 trees keep 4 x 500 + 7 x 400 tokens each
    assert v[:7] == [12 * 10_000 / 8, 4 * 10_000 / 8, 2 * 10_000 / 8, 2 * 10_000,
                     8 * 500 * kv, 2 * (4 * 500 + 7 * 400) * kv, 24 * 500 * kv]
    assert v[7] == 2 * 2 * 1000 * 1000  # bf16 logits and their gradient, (1000 tokens, 1000 ids)
    assert v[8] == 1000 * 64 * 2 * 2 + 1000 * (8 * 64 + 3 * 256) * 2
    state = 15_000 + 2_500
    assert peaks == {"rollout": state + 20_000 + 8 * 500 * kv + 2 * 4800 * kv,
                     "evaluation": state + 20_000 + 24 * 500 * kv,
                     "update": state + 5_000 + v[7] + v[8]}
    # without reuse no cache is kept; without eval sets evaluation holds none
    cfg.reuse_prefix_kv, cfg.eval_sets = False, []
    terms, peaks = bench.memory_estimate(cfg, n_params=10_000, conf=conf, gpus=8)
    assert list(terms.values())[5] == list(terms.values())[6] == 0
    assert peaks["rollout"] == state + 20_000 + 8 * 500 * kv


@pytest.mark.parametrize("name", ["qwen3_1p7b_ibtpo", "qwen3_1p7b_grpo", "qwen3_8b_ibtpo", "qwen3_8b_grpo"])
def test_every_shipped_recipe_fits_an_80_gb_gpu_at_its_worst_case(name):
    # With the default max_rows (256) evaluation alone needed 76 GiB (1.7B) and 119 GiB (8B),
    # and the 8B IB-TPO rollout with kept branch caches 105 GiB.
    from config import load_config
    cfg = load_config(f"configs/{name}.yaml")
    n, conf = bench.model_shape(cfg.model)
    # the shapes give the published sizes: Qwen3-1.7B 1.7B (1.4B without embeddings), Qwen3-8B 8.2B (6.95B)
    embed = conf.vocab_size * conf.hidden_size * (1 if conf.tie_word_embeddings else 2)
    assert (round(n / 1e9, 1), round((n - embed) / 1e9, 2)) == ((1.7, 1.41) if "1p7b" in name else (8.2, 6.95))
    _, peaks = bench.memory_estimate(cfg, n, conf, gpus=8)
    assert max(peaks.values()) <= bench.BUDGET_GIB * bench.GIB, peaks


def test_bench_memory_command():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "bench.py", "memory", "configs/qwen3_8b_ibtpo.yaml", "--overrides",
                          "reuse_prefix_kv=true"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "8.19B parameters" in out.stdout
    assert "peak, rollout" in out.stdout and "OVER 76 GiB" in out.stdout  # kept caches do not fit at 8B
