"""`python -m workbench ...` runs the same command line as the `workbench` console script."""

from __future__ import annotations

import sys

from workbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
