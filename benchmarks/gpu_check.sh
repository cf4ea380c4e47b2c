#!/usr/bin/env bash
# One command for one GPU, no network: bf16 training steps of a 4B-width LLaVA-OV-1.5 on 8k packs,
# our attention core on CUDA, tokens/s, TFLOP/s, MFU/HFU, peak memory and bf16-vs-fp32 agreement
# (benchmarks/gpu_check.py; docs/gpu-runs.md). Writes gpu_check.json and gpu_check.md to $OUT (or
# --out DIR, else outputs/gpu_check).
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-smoke    # the same code on CPU at tiny sizes (< 2 min)
#
# The Python packages the GPU image lacks travel as wheels in $LOV15_WHEELS (default ./.whl;
# benchmarks/gpu_wheels.sh fetches them): they are installed into a private folder that goes
# first on PYTHONPATH, and a megatron-core that does not import is replaced by the one in
# $LOV15_WHEELS/fallback/. --cpu-smoke uses them only when LOV15_WHEELS is set. The repository itself is used in place (no install). $PYTHON picks the
# interpreter (default python3). The whole run is stopped after $GPU_CHECK_TIMEOUT seconds
# (default 480: the check must end inside 8 minutes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="${LOV15_WHEELS:-$ROOT/.whl}"

install() {  # wheels into the private site folder (replacing what is there)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$@"
}
SITE="${TMPDIR:-/tmp}/lov15-gpu-check-site"
use_wheels=1
if [[ " $* " == *" --cpu-smoke "* && -z "${LOV15_WHEELS:-}" ]]; then
  use_wheels=0  # the smoke runs in the environment at hand (the wheels are for Python 3.12)
fi
if [[ $use_wheels == 1 ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "[gpu-check] installing $(find "$WHEELS" -maxdepth 1 -type f -name '*.whl' | wc -l) wheel(s) from $WHEELS into $SITE"
  rm -rf "$SITE"
  install "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  # If the pinned megatron-core does not import with this torch, $WHEELS/fallback/ (0.16.1, the
  # release the project ran on this GPU image before) replaces it; the report names the version.
  if ! "$PY" -c "import lov15_megatron.training.setup, lov15_megatron.training.step" \
      2>"$SITE.probe.log"; then
    tail -3 "$SITE.probe.log"
    if compgen -G "$WHEELS/fallback/*.whl" >/dev/null; then
      echo "[gpu-check] the stack does not import; installing $WHEELS/fallback/*.whl instead"
      rm -rf "$SITE/megatron" "$SITE"/megatron_core-*.dist-info
      install "$WHEELS"/fallback/*.whl
    fi
  fi
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# Fewer allocator-fragmentation OOMs when the model is built, copied to fp32 and freed.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec timeout --kill-after=20 "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py "$@"
