"""`python -m raylm.cli …` runs the `raylm` command."""

import sys

from raylm.cli import main

sys.exit(main())
