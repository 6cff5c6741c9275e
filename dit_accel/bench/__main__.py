"""``python -m dit_accel.bench ...``: the same as ``dit-accel bench ...``."""

import sys

from dit_accel.bench.cli import main

sys.exit(main())
