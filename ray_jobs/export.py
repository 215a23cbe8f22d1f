"""Entry point for `ray job submit ... -- python ray_jobs/export.py ARGS`: same arguments as `fmdist export`."""

import sys

from fmdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
