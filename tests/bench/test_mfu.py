"""bench/mfu.py on its tiny preset: the FLOPs count, the MFU column, and that the bare loops and fmdist's own
loop train the same model alike (CPU, gloo, world size 1)."""

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


def test_flops_per_token_of_the_presets():
    """bench/mfu.py counts with fmdist.train.flops; the figures docs/benchmarks.md quotes."""
    tiny = mfu.build_model(TINY, torch.device("meta"), False, "sdpa")
    # 6 x 982,144 + 12 x 4 layers x 128 x 64 = 5,892,864 + 393,216 (tests/train/test_flops.py has the hand count)
    assert mfu.flops_per_token(tiny, TINY.seq_len) == 6_286_080
    # The benchmarked model: TinyLlama-1.1B's shape, embeddings included.
    big = mfu.build_model(mfu.PRESETS["1.1b"], torch.device("meta"), False, "sdpa")
    assert sum(p.numel() for p in big.parameters()) == 1_100_048_384
    # 6,600,290,304 + 12 x 22 x 2048 x 2048 (1,107,296,256) = 7.708e9
    assert mfu.flops_per_token(big, 2048) == 7_707_586_560


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("NVIDIA H100 80GB HBM3", "39.0%"),  # the SXM part: 989e12
        ("NVIDIA H100 PCIe", "51.0%"),  # 756e12
        ("NVIDIA GeForce RTX 4090", "n/a"),  # not in the table
    ],
)
def test_mfu_column_by_device(name, column):
    """The 1.1B model (7.708e9 FLOPs a token) at 50,000 tokens/s, as the table prints it."""
    assert mfu.format_mfu(7_707_586_560, 50_000, mfu.peak_flops(name)) == column


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


@pytest.fixture(scope="module")
def two_batches() -> torch.Tensor:
    """Two different micro-batches, alternated: a loop that fed them in another order would diverge."""
    return mfu.random_batches(TINY.llama["vocab_size"], 2, TINY.micro_batch_size, TINY.seq_len, CPU)


def test_fmdist_loop_trains_like_bare_deepspeed(two_batches):
    """fmdist's fit (causal-lm, packed rows through LoopIO) against a bare deepspeed.initialize loop, ZeRO-2:
    the same initial weights, batches, AdamW and clipping give the same loss at every step."""
    bare = mfu.run_cell(mfu.Cell("deepspeed", 2, False), TINY, two_batches, 0, STEPS, CPU, False, LR)
    ours = mfu.run_cell(mfu.Cell("fmdist", 2, False), TINY, two_batches, 0, STEPS, CPU, False, LR)
    assert len(ours.losses) == STEPS
    assert ours.losses[-1] < ours.losses[0] - 0.5, ours.losses
    torch.testing.assert_close(ours.losses, bare.losses, rtol=1e-5, atol=1e-5)
    assert ours.tokens_per_s > 0 and ours.step_s > 0
