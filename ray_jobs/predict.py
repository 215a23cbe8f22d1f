"""Entry point for `ray job submit ... -- python ray_jobs/predict.py ARGS`: same arguments as `fmdist predict`."""

import sys

from fmdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
