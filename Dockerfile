# GPU image for cluster runs. The NGC PyTorch container ships CUDA, NCCL, Transformer Engine and
# Apex built for its CUDA version, so only this package and its pure-Python dependencies are
# installed on top. Build on a machine with Docker (not possible in the CPU CI):
#   docker build -t lov15-megatron:latest .
# Pick the NGC tag whose PyTorch matches the pin in pyproject.toml, or install with
# `--no-deps` and let the container's torch stand (recommended: the container's torch, TE and
# Apex are built together).
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/lov15-megatron
COPY pyproject.toml README.md ./
COPY lov15_megatron ./lov15_megatron
COPY configs ./configs
COPY tools ./tools
COPY examples ./examples
COPY scripts ./scripts

# Keep the container's CUDA builds of torch / TE / Apex; add megatron-core and the rest.
RUN pip install --no-cache-dir "megatron-core==0.16.1" "megatron-energon==7.4.1" \
        "transformers==5.23.0" safetensors pyyaml webdataset pillow tqdm \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import transformer_engine, megatron.core; print('TE and Megatron-Core OK')" \
 && (python -c "import apex" 2>/dev/null && echo "Apex OK" \
     || echo "Apex not in this container tag: Megatron-Core falls back to torch AdamW")

ENV OMP_NUM_THREADS=8
CMD ["bash"]
