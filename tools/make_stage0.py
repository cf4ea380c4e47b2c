#!/usr/bin/env python
"""Build the stage-0 LLaVA-OV-1.5 checkpoint from a Rice ViT and a Qwen3 checkpoint; see ``--help``.

The code is ``lov15_megatron/cli/make_stage0.py``; an installed package has the same command as
``lov15-make-stage0``.
"""

import sys

from lov15_megatron.cli.make_stage0 import main

if __name__ == "__main__":  # the guard matters: worker processes are spawned
    sys.exit(main())
