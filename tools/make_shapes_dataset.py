#!/usr/bin/env python
"""Generate the procedural shapes data set of the quickstart; see ``--help``.

The code is ``lov15_megatron/demo/make_shapes_dataset.py``; an installed package has the same
command as ``lov15-make-shapes-dataset``.
"""

import sys

from lov15_megatron.demo.make_shapes_dataset import main

if __name__ == "__main__":  # the guard matters: worker processes are spawned
    sys.exit(main())
