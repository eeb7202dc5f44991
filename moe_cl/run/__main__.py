"""``python -m moe_cl.run``: the command line of :mod:`moe_cl.run.cli`."""

import sys

from moe_cl.run.cli import main

sys.exit(main())
