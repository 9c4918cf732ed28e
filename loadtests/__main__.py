"""Entry point of `python -m loadtests`."""

import sys

from loadtests.cli import main

sys.exit(main())
