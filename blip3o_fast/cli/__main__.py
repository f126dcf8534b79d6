"""`python -m blip3o_fast.cli ...`: the same as the `blip3o-fast` script."""

import sys

from .main import main

sys.exit(main())
