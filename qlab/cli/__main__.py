"""`python -m qlab.cli` is the `qlab` command."""

import sys

from qlab.cli.main import main

sys.exit(main())
