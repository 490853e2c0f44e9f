"""``python -m sweepbench.cli``."""

import sys

from . import main

sys.exit(main())
