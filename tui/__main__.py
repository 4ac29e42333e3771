"""`python -m tui`: the operator console."""

import sys

from tui.cli import main

sys.exit(main())
