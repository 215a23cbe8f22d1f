"""Entry point for `ray job submit ... -- python ray_jobs/report.py ARGS`: same arguments as `fmdist report`."""

import sys

from fmdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
