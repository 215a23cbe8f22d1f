"""Entry point for `ray job submit ... -- python ray_jobs/tune.py ARGS`: same arguments as `fmdist tune`."""

import sys

from fmdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
