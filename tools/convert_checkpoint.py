#!/usr/bin/env python
"""Hugging Face ⇄ Megatron-Core checkpoint conversion; see ``--help`` and docs/conversion.md."""

import sys

from lov15_megatron.cli.convert_checkpoint import main

if __name__ == "__main__":  # the guard matters: checkpoint I/O starts helper processes (spawn)
    sys.exit(main())
