#!/usr/bin/env bash
# The embedded default: install (if needed), then train a tiny Qwen3-style Megatron-Core model
# on CPU with 2 gloo ranks at TP=2, save it as a distributed checkpoint, and continue from that
# checkpoint at PP=2 (resharded at load). Takes about a minute on 2 cores after installation.
#   bash scripts/quickstart.sh [key.sub=value …]   (overrides apply to both runs)
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
OUT="${OUT:-runs/quickstart}"
NPROC="${NPROC:-2}"
rm -rf "$OUT"
mkdir -p "$OUT"
echo "[quickstart] 1/2: train tiny GPT at TP=2 on $NPROC CPU ranks -> $OUT/tp2"
python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m lov15_megatron.train \
  --config configs/tiny_gpt.yaml parallel.tensor_model_parallel_size=2 \
  checkpoint.save="$OUT/tp2" "$@" | tee "$OUT/tp2.log"
echo "[quickstart] 2/2: continue from $OUT/tp2 at PP=2 (checkpoint resharded at load)"
python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m lov15_megatron.train \
  --config configs/tiny_gpt.yaml parallel.pipeline_model_parallel_size=2 \
  checkpoint.pretrained="$OUT/tp2" checkpoint.save="$OUT/pp2" "$@" | tee "$OUT/pp2.log"
echo
echo "[quickstart] summary"
for run in tp2 pp2; do
  echo "  $run: $(grep '^done:' "$OUT/$run.log") ; checkpoint $OUT/$run"
  grep '^iter' "$OUT/$run.log" | tail -n 1 | sed 's/^/    last step: /'
done
