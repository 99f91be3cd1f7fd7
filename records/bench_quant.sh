#!/usr/bin/env bash
# Quantization benchmark (CPU): train one small model once, then export the SAME fp32 checkpoint
# through several quantization settings (QUANT_ONLY=final_model.pt) and compare bytes and bpb.
#   records/bench_quant.sh CORPUS_DIR [WORK_DIR]
# CORPUS_DIR holds datasets/webmix_sp1024/ and tokenizers/fineweb_1024_bpe.model (the stand-in corpus).
# Validation is the first VAL_TOKENS tokens of the corpus's val shard, to keep each evaluation short.
set -euo pipefail
corpus=$(realpath "$1"); work=${2:-/tmp/bench_quant}; repo=$(realpath "$(dirname "$0")/..")
val_tokens=${VAL_TOKENS:-300000}
mkdir -p "$work/data" && cd "$work"
ln -sf "$corpus"/datasets/webmix_sp1024/fineweb_train_*.bin data/
python3 - "$corpus/datasets/webmix_sp1024/fineweb_val_000000.bin" data/fineweb_val_000000.bin "$val_tokens" <<'PY'
import sys, numpy as np
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokens = np.fromfile(src, dtype="<u2", offset=1024)[:n]
header = np.zeros(256, dtype="<i4"); header[:3] = (20240520, 1, len(tokens))
with open(dst, "wb") as f:
    f.write(header.tobytes()); f.write(tokens.tobytes())
PY
export DATA_PATH=$work/data TOKENIZER_PATH=$corpus/tokenizers/fineweb_1024_bpe.model \
  NUM_LAYERS=${NUM_LAYERS:-4} MODEL_DIM=${MODEL_DIM:-256} NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 \
  EVAL_SEQ_LEN=256 EVAL_STRIDE=256 TRAIN_BATCH_TOKENS=8192 WARMUP_STEPS=2 WARMDOWN_ITERS=100 \
  MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 EMA_DECAY=0.95 VAL_BATCH_SIZE=65536
# Matrices of this small width fall under the 65,536-element "small tensor" rule: force them in.
mats='\.(c_q|c_k|c_v|proj|fc)\.weight$'
[ -f final_model.pt ] || ITERATIONS=${ITERATIONS:-200} LATE_QAT_THRESHOLD=0 QUANT_METHOD=rtn RUN_ID=train \
  python3 "$repo/train_gpt.py" > train.out 2>&1
run() {  # name, env...
  local name=$1; shift
  env RUN_ID="q_$name" QUANT_ONLY=final_model.pt "$@" python3 "$repo/train_gpt.py" > "q_$name.out" 2>&1
  printf "| %s | %s | %s | %s | %s |\n" "$name" \
    "$(grep -oP 'Serialized model int\S+: \K\d+' "q_$name.out")" \
    "$(grep -oP 'pre_quant val_loss:\S+ val_bpb:\K\S+' "q_$name.out")" \
    "$(grep -oP 'roundtrip_exact val_loss:\S+ val_bpb:\K\S+' "q_$name.out")" \
    "$(grep -oP 'quant_gap val_bpb:\K\S+' "q_$name.out")"
}
echo "| export | model bytes | pre-quant bpb | round-trip bpb | gap |"
echo "|---|---:|---:|---:|---:|"
run rtn_int6 QUANT_METHOD=rtn QUANT_CLIP_RATIOS=1.0 QUANT_OVERRIDES="$mats:6"
run clip_int6 QUANT_METHOD=rtn QUANT_OVERRIDES="$mats:6"
run gptq_int6 QUANT_METHOD=gptq QUANT_OVERRIDES="$mats:6"
run gptq_int5mlp QUANT_METHOD=gptq QUANT_OVERRIDES="$mats:6,mlp\.(fc|proj)\.weight$:5"
run rtn_int5mlp QUANT_METHOD=rtn QUANT_OVERRIDES="$mats:6,mlp\.(fc|proj)\.weight$:5"
