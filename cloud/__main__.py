"""`python -m cloud`: same as `hybridgen cloud`."""

import sys

from cloud.cli import main

sys.exit(main(sys.argv[1:]))
