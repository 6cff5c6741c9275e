"""``python -m dit_accel.eval``: the ``dit-accel eval`` subcommand on its own."""

import sys

from dit_accel.eval.cli import main

sys.exit(main())
