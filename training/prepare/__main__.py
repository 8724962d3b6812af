"""``python -m training.prepare``."""

import sys

from training.prepare.cli import main

sys.exit(main())
