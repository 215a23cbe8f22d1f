"""Entry point for `ray job submit ... -- python ray_jobs/federate.py ARGS`: same arguments as `fmdist federate`."""

import sys

from fmdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["federate", *sys.argv[1:]]))
