"""`python -m cldf ...`: the `cldf` command, e.g. for a child process of the Slicer module."""

import sys

from .cli import main

sys.exit(main())
