"""Entry point for `ray job submit ... -- python ray_jobs/prepare.py ARGS`: same arguments as `fmdist prepare`."""

import sys

from fmdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
