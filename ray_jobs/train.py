"""Entry point for `ray job submit ... -- python ray_jobs/train.py ARGS`: same arguments as `fmdist train`."""

import sys

from fmdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
