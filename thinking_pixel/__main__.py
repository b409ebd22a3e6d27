"""``python -m thinking_pixel ...``: the same command line as ``thinking-pixel``."""

import sys

from .cli import main

sys.exit(main())
