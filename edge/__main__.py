"""`python -m edge`: same as `hybridgen edge`."""

import sys

from edge.cli import main

sys.exit(main(sys.argv[1:]))
