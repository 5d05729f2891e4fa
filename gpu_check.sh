#!/usr/bin/env bash
# The GPU check: one script for an H100/H200 machine with no internet, about 8 minutes.
# It measures, on random-init models of the real Qwen2.5-1.5B shape (no download), forced lengths:
#   engine.sample vs generate's sampler on Qwen's vocabulary; IBTree vs GRPO rollout wall time with
#   both engines; training tokens/s, MFU and peak memory; then 3 train.py steps of IB-TPO
#   (time_rollout, time_train, peak_mem_gb). Not yet run on a GPU: the README has no GPU figures.
#
# An offline GPU image may lack the pinned pure-Python packages: download their wheels first,
# on a machine with internet, into .whl/ (the script installs them from there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.24.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
#     antlr4-python3-runtime==4.13.2 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18
# then, on the GPU machine: bash gpu_check.sh   (writes runs/gpu_check/gpu_check.log)
set -uo pipefail
OUT=${OUT:-runs/gpu_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
echo "== bench sample: engine.sample vs generate's sampler on Qwen's vocabulary"
timeout 30 python3 bench.py sample --vocab qwen --rows 256 --n 20
echo "== bench rollout: IBTree vs GRPO wall time"
timeout 240 python3 bench.py rollout --model qwen2.5-1.5b --rows 64 --tokens 192 --questions 16 --step 48 --repeat 1
echo "== bench train: tokens/s, MFU, peak memory"
timeout 90 python3 bench.py train --model qwen2.5-1.5b --rows 8 --length 2048 --checkpointing
echo "== train.py, 3 steps of IB-TPO on a random-init Qwen2.5-1.5B shape"
python3 - <<'PY'
import json, os, random, torch, toy
from transformers import Qwen2Config, Qwen2ForCausalLM
tok = toy.build_tokenizer()
cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
with torch.device("cuda"):
    m = Qwen2ForCausalLM(cfg)
m.save_pretrained("/tmp/q15"); tok.save_pretrained("/tmp/q15")
rng = random.Random(0)
with open("/tmp/q15.jsonl", "w") as f:
    for i in range(256):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        f.write(json.dumps({"question": f"Compute {a}+{b}.", "answer": str(a + b)}) + "\n")
PY
timeout 150 torchrun --standalone --nproc_per_node=1 train.py configs/tiny_cpu.yaml model=/tmp/q15 data=/tmp/q15.jsonl \
  run_dir=/tmp/run_q15 dtype=bfloat16 B0=4 L=9 max_step_tokens=64 max_response_tokens=256 temperature=0.7 top_p=0.95 \
  top_k=20 questions_per_step=16 steps=3 lr=1e-6 micro_batch_tokens=16384 grad_checkpointing=true save_every=0 dump_trees=0
python3 -c "
import json
for l in open('/tmp/run_q15/metrics.jsonl'):
    r = json.loads(l); print({k: r.get(k) for k in ['step','time_rollout','time_train','gen_tokens','trajectories','peak_mem_gb','pad_frac']})"
} 2>&1 | tee "$OUT/gpu_check.log"
