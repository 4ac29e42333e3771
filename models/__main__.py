"""`python -m models`: same as `hybridgen models`."""

import sys

from models.cli import main

sys.exit(main())
