"""``python -m moe_cl.reproduce``: the entry point of :mod:`moe_cl.suite.reproduce`."""

import sys

from moe_cl.suite.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
