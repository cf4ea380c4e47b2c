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


class _DropNotice(logging.Filter):
    """Drops the log records of one logger whose message starts with ``prefix``; every other
    record still goes through."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# PyTorch logs "No CUDA runtime is found, using CUDA_HOME=…" when a CUDA toolkit directory exists
# on a machine without a GPU (Megatron-Core 0.19 imports ``torch.utils.cpp_extension``); on CPU
# that is the intended situation.
logging.getLogger("torch.utils.cpp_extension").addFilter(_DropNotice("No CUDA runtime is found"))
# Megatron-Core 0.19 logs at every GPTModel it builds that GPTModel takes only bug fixes from now
# on (its HybridModel is the successor); a notice for Megatron's developers, printed before a
# command's own output or one-line error. Moving to HybridModel is its own change.
logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(
    _DropNotice("GPTModel IS DEPRECATED")
)


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
