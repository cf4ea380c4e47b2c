#!/usr/bin/env python
"""Score a Hugging Face export on a local question-answer set; see ``--help``.

The code is ``lov15_megatron/cli/evaluate.py``; an installed package has the same command as
``lov15-evaluate``.
"""

import sys

from lov15_megatron.cli.evaluate import main

if __name__ == "__main__":  # the guard matters: worker processes are spawned
    sys.exit(main())
