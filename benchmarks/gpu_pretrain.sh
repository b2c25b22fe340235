#!/usr/bin/env bash
# GPT-2 124M pre-training throughput on every visible GPU: bf16 autocast, torch.compile, FSDP2,
# launched by torchrun. Prints tokens/s (all GPUs and per GPU), MFU and peak memory per GPU.
#
#   bash benchmarks/gpu_pretrain.sh                  # synthetic tokens, 300 steps
#   DATA=path/to/shards STEPS=500 bash benchmarks/gpu_pretrain.sh
#
# The model is GPT-2 small as lmforge configures it: d_model 768, 12 layers, 12 heads (head 64),
# vocabulary 50304 (50257 padded to a multiple of 128), sequence 1024, learned absolute positions,
# LayerNorm with biases, GELU MLP of width 3072, tied input/output embedding: 124.5M weights.
# Each GPU runs micro-batches of MICRO sequences and accumulates ACCUM of them per step (default
# 16 x 4 = 64 x 1024 = 65,536 tokens per GPU per step). FSDP2 shards weights, gradients and
# AdamW state over the GPUs; on a single GPU lmforge leaves the model unwrapped (nothing to shard).
# Without DATA, uniform random tokens are written once to $OUT/data: the loss stays near
# ln(50257) = 10.8, which does not change the speed.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NGPU=${NGPU:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
STEPS=${STEPS:-300}
MICRO=${MICRO:-16}
ACCUM=${ACCUM:-4}
OUT=${OUT:-runs/gpu_pretrain}
SKIP=${SKIP:-20}  # steps left out of the averages: compilation and warm-up

if [ "$NGPU" -lt 1 ]; then
    echo "gpu_pretrain.sh: no CUDA GPU visible (torch.cuda.device_count() is 0)" >&2
    exit 1
fi
if [ "$STEPS" -le "$SKIP" ]; then
    echo "gpu_pretrain.sh: STEPS=$STEPS must exceed SKIP=$SKIP (warm-up steps not averaged)" >&2
    exit 1
fi

if [ -z "${DATA:-}" ]; then
    DATA="$OUT/data"
    if [ ! -f "$DATA/index.json" ]; then
        "$PYTHON" - "$DATA" <<'EOF'
import json, sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
splits = {}
for split, n in (("train", 50_000_000), ("validation", 1_000_000)):
    rng.integers(0, 50257, size=n, dtype=np.uint16).tofile(out / f"{split}_00000.bin")
    splits[split] = [{"file": f"{split}_00000.bin", "tokens": n, "documents": 1}]
index = {"format": "lmforge-shards", "version": 1, "dtype": "uint16", "vocab_size": 50304,
         "bos_id": None, "eos_id": 0, "splits": splits}
(out / "index.json").write_text(json.dumps(index))
EOF
    fi
fi

rm -rf "$OUT/run"
torchrun --standalone --nproc_per_node="$NGPU" -m lmforge pretrain \
    --data="$DATA" --out="$OUT/run" \
    --model.vocab_size=50304 --model.d_model=768 --model.n_layers=12 --model.n_heads=12 \
    --model.max_seq_len=1024 --model.position=learned --model.norm=layernorm \
    --model.mlp=gelu_tanh --model.d_ff=3072 --model.bias=true --model.tie_embeddings=true \
    --model.dropout=0.0 \
    --train.steps="$STEPS" --train.batch_size="$MICRO" --train.grad_accum="$ACCUM" \
    --train.seq_len=1024 --train.lr=6e-4 --train.warmup_steps=30 --train.weight_decay=0.1 \
    --train.precision=bf16 --train.compile=true --train.parallel=fsdp \
    --train.eval_every=0 --train.eval_batches=4 --train.save_every=0 --train.log_every=10 \
    --train.device=cuda

"$PYTHON" - "$OUT/run/metrics.jsonl" "$NGPU" "$SKIP" <<'EOF'
import json, statistics, sys

path, ngpu, skip = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(line) for line in open(path) if '"loss"' in line]
rows = [r for r in rows if "event" not in r and r["step"] > skip]
tok_s = statistics.median(r["tok_per_s"] for r in rows)
mfu = statistics.median(r["mfu"] for r in rows)
mem = max(r["mem_peak_mb"] for r in rows)
print(f"steps {rows[0]['step']}-{rows[-1]['step']} on {ngpu} GPU(s), median over steps:")
print(f"  tokens/s   {tok_s:,.0f} in all, {tok_s / ngpu:,.0f} per GPU")
print(f"  MFU        {100 * mfu:.1f}% (6N + 12*L*H*Dh*T FLOPs per token, dense bf16 peak)")
print(f"  memory     {mem / 1024:.1f} GiB peak allocated on rank 0")
print(f"  last loss  {rows[-1]['loss']:.3f}")
EOF
