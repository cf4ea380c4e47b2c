#!/usr/bin/env bash
# The embedded default: install (if needed), then run the whole LLaVA-OV-1.5 pipeline on CPU —
# generated shapes data -> tiny Rice ViT pretrained on the training images + random Qwen3 ->
# stage-0 -> packing -> HF->Megatron -> stage 1 (TP=2) -> stage 1.5 (PP=2) -> stage 2 (DP=2) on
# 2 gloo ranks -> export to HF -> generate() answers to held-out questions -> summary (accuracy
# per question type beside the always-majority baseline). See lov15_megatron/demo/quickstart.py.
#   bash scripts/quickstart.sh [--size small] [--out runs/quickstart] [--seed 0] [--lora] [--video]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m lov15_megatron.demo.quickstart "$@"
