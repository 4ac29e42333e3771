"""`python -m hybridgen`: the same as the `hybridgen` command."""

import sys

from hybridgen.cli import main

sys.exit(main())
