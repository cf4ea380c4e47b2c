"""The Hugging Face remote code of LLaVA-OneVision-1.5: the three files every export carries.

``mcore-to-hf`` and ``save_pretrained_with_code`` copy exactly these files next to the weights,
and ``config.json``'s ``auto_map`` names them, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` and ``AutoProcessor.from_pretrained(dir, trust_remote_code=True)`` work
without this package installed. They import only the standard library, ``transformers``,
``torch``, ``numpy``, ``PIL``, PyAV (``av``, only when the processor reads a video file) and each
other (relative imports), never ``lov15_megatron``: ``tests/test_hf_model.py`` loads an
export in a process without the package on its path.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: The source files that make the model loadable as remote code (copied next to exports).
CODE_FILES: tuple[Path, ...] = (
    _HERE / "configuration_llavaonevision1_5.py",
    _HERE / "modeling_llavaonevision1_5.py",
    _HERE / "processing_llavaonevision1_5.py",
)
