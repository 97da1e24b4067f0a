"""`python bench/run.py [options]`: the same as `python -m bench` (run from the repository root)."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable (for `bench` and `tests`), not bench/ itself.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.driver import main

if __name__ == "__main__":
    sys.exit(main())
