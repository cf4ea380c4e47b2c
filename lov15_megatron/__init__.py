"""lov15-megatron: LLaVA-OneVision-1.5 pretraining on Megatron-Core."""

import logging
import warnings
from importlib.metadata import PackageNotFoundError, version

# Megatron-Core warns at import time, once per module, that Transformer Engine / Apex are absent
# and it falls back to its PyTorch implementations. On CPU (tests, the quickstart, the tools) that
# fallback is the intended path, and the warnings would precede every command's own output, even
# a one-line error. Only these known messages are silenced; every other warning still shows.
# This runs before any module of the package imports megatron.
for _message in (
    r"Transformer Engine and Apex are not installed\. Falling back to ",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"absl\.logging is not installed\. Using logging\.getLogger",  # megatron-core 0.19
    # TransformerConfig's own default CUDA-graph scope "full" warns that "full" is deprecated
    # (0.16: cuda_graph_scope, 0.19: cuda_graph_modules), at every model a command builds (no
    # CUDA graphs are used here).
    r"full scope is deprecated\. Use empty cuda_graph_(scope|modules) to capture",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning, module="megatron")


class _NoCudaRuntimeNotice(logging.Filter):
    """PyTorch logs "No CUDA runtime is found, using CUDA_HOME=…" when a CUDA toolkit directory
    exists on a machine without a GPU (Megatron-Core 0.19 imports ``torch.utils.cpp_extension``).
    On CPU that is the intended situation; only this record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())


def _version() -> str:
    """The installed distribution's version; ``pyproject.toml``'s ``[project] version`` is its one
    source. A source checkout that was never installed reads that file directly."""
    try:
        return version("lov15-megatron")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        if not pyproject.is_file():
            return "0+unknown"
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])


__version__ = _version()
