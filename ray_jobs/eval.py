"""Entry point for `ray job submit ... -- python ray_jobs/eval.py ARGS`: same arguments as `fmdist eval`."""

import sys

from fmdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
