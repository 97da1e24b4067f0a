"""`python -m bench`: see bench/README.md."""

import sys

from bench.driver import main

sys.exit(main())
