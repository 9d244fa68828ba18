"""``python -m forwardgrad``: the same command line as ``forwardgrad``."""

import sys

from forwardgrad.cli import main

sys.exit(main())
