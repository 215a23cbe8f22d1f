"""bench/mfu.py on its tiny preset: the FLOPs count, the peak table, and that both bare loops train (CPU, gloo, world size 1)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "bench" / "mfu.py"
_spec = importlib.util.spec_from_file_location("bench_mfu", _PATH)
mfu = importlib.util.module_from_spec(_spec)
sys.modules["bench_mfu"] = mfu  # dataclasses resolve their module through sys.modules
_spec.loader.exec_module(mfu)

CPU = torch.device("cpu")
TINY = mfu.PRESETS["tiny"]
STEPS = 10
LR = 1e-3


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from threads; on a loaded 2-core runner a second thread spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _repeated_batch() -> torch.Tensor:
    return mfu.random_batches(TINY.llama["vocab_size"], 1, TINY.micro_batch_size, TINY.seq_len, CPU)


@pytest.fixture(scope="module")
def torch_losses() -> list[float]:
    """The reference: bare torch loop, fp32, one batch repeated for STEPS steps."""
    return mfu.run_cell(mfu.Cell("torch", None, False), TINY, _repeated_batch(), 0, STEPS, CPU, False, LR).losses


def test_flops_per_token_matches_a_hand_count():
    # Tiny: embeddings 2 x 1000 x 128 = 256,000; per layer q 128x128 + k, v 128x64 each + o 128x128
    # = 49,152, MLP 3 x 128 x 344 = 132,096, two norms 256 -> 181,504 x 4 layers = 726,016; final norm 128.
    tiny = mfu.build_model(TINY, torch.device("meta"), False, "sdpa")
    assert sum(p.numel() for p in tiny.parameters()) == 982_144
    # 6 x 982,144 + 12 x 4 layers x 128 x 64 = 5,892,864 + 393,216
    assert mfu.flops_per_token(982_144, 4, 128, 64) == 6_286_080
    # The benchmarked model: TinyLlama-1.1B's shape, embeddings included.
    big = mfu.build_model(mfu.PRESETS["1.1b"], torch.device("meta"), False, "sdpa")
    n = sum(p.numel() for p in big.parameters())
    assert n == 1_100_048_384
    # 6,600,290,304 + 12 x 22 x 2048 x 2048 (1,107,296,256)
    assert mfu.flops_per_token(n, 22, 2048, 2048) == 7_707_586_560


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # the SXM part's name
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_by_device_name(name, peak):
    assert mfu.peak_flops(name) == peak


def test_bare_torch_loop_lowers_the_loss(torch_losses):
    assert len(torch_losses) == STEPS
    assert torch_losses[-1] < torch_losses[0] - 1.0, torch_losses


def test_activation_checkpointing_changes_memory_not_the_math(torch_losses):
    losses = mfu.run_cell(mfu.Cell("torch", None, True), TINY, _repeated_batch(), 0, STEPS, CPU, False, LR).losses
    torch.testing.assert_close(losses, torch_losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("zero_stage", "checkpointing"), [(2, False), (3, True)])
def test_bare_deepspeed_loop_lowers_the_loss_like_torch(torch_losses, zero_stage, checkpointing):
    """World size 1, gloo, fp32: the same model, data, AdamW and clipping as the torch loop."""
    cell = mfu.Cell("deepspeed", zero_stage, checkpointing)
    losses = mfu.run_cell(cell, TINY, _repeated_batch(), 0, STEPS, CPU, False, LR).losses
    assert losses[-1] < losses[0] - 1.0, losses
    torch.testing.assert_close(losses, torch_losses, rtol=1e-4, atol=1e-4)
