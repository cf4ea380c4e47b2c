"""The models the converter knows, by the name used on the command line (``--model``)."""

from __future__ import annotations

from lov15_megatron.convert.mapping import ConversionError


def get_converter(name: str):
    if name == "qwen3":
        from lov15_megatron.convert.qwen3 import Qwen3Converter

        return Qwen3Converter()
    if name == "llava-ov-1.5":
        from lov15_megatron.convert.llava_ov import LLaVAOneVisionConverter

        return LLaVAOneVisionConverter()
    raise ConversionError(f"unknown --model {name!r}; known: {', '.join(MODELS)}")


MODELS = ("qwen3", "llava-ov-1.5")
