"""Entry point for `ray job submit -- python jobs/train.py --config ... --data ... --out ...`.

Same arguments as `p2p train`; inside a submitted job Ray is already running, and the job
joins that cluster (RAY_ADDRESS is set by the job supervisor).
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
