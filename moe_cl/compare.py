"""``python -m moe_cl.compare``: the entry point of :mod:`moe_cl.suite.compare`."""

import sys

from moe_cl.suite.compare import main

if __name__ == "__main__":
    sys.exit(main())
