"""`python -m broker`: the same as `hybridgen broker`."""

import sys

from broker.cli import main

sys.exit(main(sys.argv[1:]))
