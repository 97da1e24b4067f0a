"""`python -m bench`: see bench/README.md."""

import sys

if "--scale" in sys.argv[1:]:  # the cache-size benchmark: bench/scale.py
    from bench.scale import main

    sys.exit(main([arg for arg in sys.argv[1:] if arg != "--scale"]))

from bench.driver import main

sys.exit(main())
