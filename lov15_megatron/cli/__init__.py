"""The command-line tools: one module per tool, each with ``main(argv) -> exit status``.

Each is installed as a console script (``pyproject.toml``) and wrapped by the repository's
``tools/*.py``, so ``lov15-pack-offline …``, ``python -m lov15_megatron.cli.pack_offline …`` and
``python tools/pack_offline.py …`` are the same command. The checkpoint converter's CLI lives with
the converters (:mod:`lov15_megatron.cli.convert_checkpoint`, ``lov15-convert-checkpoint``).
"""
