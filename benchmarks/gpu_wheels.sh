#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh needs on the GPU machine (no network there) into
# ./.whl (or $LOV15_WHEELS), for its Python 3.12 on x86-64. The GPU image already holds torch
# 2.11 (CUDA 13), numpy, packaging, pyyaml, safetensors, tokenizers 0.23, huggingface-hub 1.33,
# regex, tqdm and typer; what it lacks or holds at another version than pyproject.toml pins:
#
#   megatron-core 0.19.2  (the pin for Python >= 3.12; needs torch, numpy, packaging)   ~2.4 MB
#   transformers 5.23.0   (the pin; the image has 5.17)                                 ~13 MB
#
# and, in fallback/, megatron-core 0.16.1 (~2.6 MB; the release the project's first GPU run used
# with this image's torch), which gpu_check.sh installs instead if 0.19.2 does not import.
# About 18.3 MB in all, inside the 64 MiB a device run carries. Run it where pip reaches PyPI:
#   bash benchmarks/gpu_wheels.sh && echo /.whl/ >> .git/info/exclude
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${LOV15_WHEELS:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST/fallback"
download() {  # DIR SPEC…: wheels for CPython 3.12 on x86-64 Linux, no dependencies
  local dir="$1"
  shift
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}
download "$DEST" megatron-core==0.19.2 transformers==5.23.0
download "$DEST/fallback" megatron-core==0.16.1
du -ch "$DEST"/*.whl "$DEST"/fallback/*.whl | tail -1
