"""Entry point for `ray job submit -- python jobs/refresh.py --config jobs/configs/refresh-*.yaml [...]`.

Same arguments as `p2p refresh`. Exits 0 when the store is up to date (committed or nothing
changed), 1 when some users failed (their previous adapters stay committed), 2 on bad input.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))
