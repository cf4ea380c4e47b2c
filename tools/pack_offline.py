#!/usr/bin/env python
"""Pack raw image-text / instruction samples into length-packed Energon shards; see ``--help``.

The code is ``lov15_megatron/cli/pack_offline.py``; an installed package has the same command as
``lov15-pack-offline``.
"""

import sys

from lov15_megatron.cli.pack_offline import main

if __name__ == "__main__":  # the guard matters: worker processes are spawned
    sys.exit(main())
