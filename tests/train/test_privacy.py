"""DP-SGD (train/privacy.py): accounting, noise, per-sample clipping before the reduction, config rules, LoRA.

In-process runs are world size 1 (gloo); the clipping-before-reduction test spawns 2 gloo ranks with a
real DeepSpeed ZeRO-0 engine each.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fmdist.config import ConfigError, freeze_labels, from_dict
from fmdist.eval import card
from fmdist.train import privacy
from fmdist.train.checkpoint import consolidated_state_dict, read_meta
from fmdist.train.export import export
from fmdist.train.loop import LoopIO, fit
from tests.conftest import NEGATIVE, POSITIVE, TINY_MODEL, sentiment_rows


def _batches(rows: dict[str, list], size: int) -> list[dict[str, list]]:
    n = len(rows["label"])
    return [{k: v[i : i + size] for k, v in rows.items()} for i in range(0, n, size)]


def _raw(**sections) -> dict:
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"train": "unused-by-the-loop"},
        "train": {"epochs": 1, "micro_batch_size": 16, "gradient_accumulation_steps": 2, "lr": 1e-2,
                  "log_every_steps": 1, "shuffle": False},
        "deepspeed": {"zero_stage": 0},
        "scaling": {"num_workers": 1},
    }  # fmt: skip
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _fit(raw: dict, rows: dict[str, list], scratch: Path, iters: int, eval_rows: dict | None = None, **io):
    """One in-process run over `rows` (micro-batches in order); returns (summary, reports)."""
    cfg = from_dict(raw)
    reports: list[tuple[dict, str | None]] = []
    io = LoopIO(
        train_batches=lambda epoch: iter(_batches(rows, cfg.train.micro_batch_size)),
        iters_per_epoch=lambda epoch: iters,
        num_train_rows=len(rows["label"]),
        report=lambda metrics, path: reports.append((metrics, path)),
        scratch_dir=str(scratch),
        eval_batches=(lambda: iter(_batches(eval_rows, 32))) if eval_rows else None,
        **io,
    )
    return fit(cfg, io), reports


def _weights(path: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in consolidated_state_dict(path).items()}


def test_epsilon_is_reported_as_opacus_accounts_it_and_meets_the_target(tmp_path):
    """target_epsilon 3: sigma is derived, the reported epsilon is Opacus's RDP figure for the recorded
    (sigma, q, steps) and lands just under the target; the checkpoint and the model card carry it."""
    from opacus.accountants import RDPAccountant

    rows = sentiment_rows(128, seed=5)  # global batch 32 of 128 rows: q = 0.25, 4 steps per epoch
    summary, reports = _fit(
        _raw(privacy={"target_epsilon": 3.0, "accountant": "rdp", "noise_seed": 0}), rows, tmp_path, iters=8
    )
    metrics, path = reports[-1]
    assert metrics["privacy/sample_rate"] == 0.25 and metrics["privacy/steps"] == 4 == summary["step"]
    assert metrics["privacy/delta"] == 1 / 256  # default 1 / (2n)
    accountant = RDPAccountant()
    accountant.history = [(metrics["privacy/noise_multiplier"], 0.25, 4)]
    expected = accountant.get_epsilon(delta=1 / 256)
    assert math.isfinite(metrics["privacy/epsilon"])
    assert metrics["privacy/epsilon"] == pytest.approx(expected, rel=1e-9)
    assert 3.0 - 0.05 <= metrics["privacy/epsilon"] <= 3.0
    assert summary["privacy/epsilon"] == metrics["privacy/epsilon"]
    meta = read_meta(path)
    assert meta["privacy"]["epsilon"] == metrics["privacy/epsilon"] and meta["privacy"]["steps_taken"] == 4
    text = card.render({**meta, "compute": {}})
    assert "## Differential privacy" in text and f"{metrics['privacy/epsilon']:.2f}" in text
    # The checkpoint holds what trained (embeddings frozen); export rebuilds the base and loads it over it.
    exported = Path(export(path, str(tmp_path / "export")))
    assert f"{metrics['privacy/epsilon']:.2f}" in (exported / "README.md").read_text()
    weights = load_file(exported / "model.safetensors")
    trained = consolidated_state_dict(path)
    assert trained.keys() <= weights.keys() and all(torch.equal(weights[k], trained[k].float()) for k in trained)


def test_zero_noise_and_no_clipping_equal_the_plain_loop(tmp_path, monkeypatch):
    """q = 1 (global batch 32 = every row each step), sigma 0, C huge: DP-SGD's sum of per-sample gradients
    / B must equal the plain loop's batch-mean gradient, so the weights agree (the plain run freezes the
    embeddings too, as DP does by default).

    Both runs step with SGD instead of AdamW: Adam divides by sqrt(v), which turns float rounding in
    gradients that are zero in exact arithmetic (attention's key bias) into lr-sized steps."""
    import deepspeed  # noqa: F401  (imported first: it subclasses torch.optim.AdamW at import)

    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, lr, fused=None: torch.optim.SGD(groups, lr=lr))
    rows = sentiment_rows(32, seed=6)
    steps = {"max_steps": 2, "lr": 0.5, "warmup_ratio": 0.0}
    plain = _raw(train={"max_grad_norm": 0.0, **steps})
    dp = _raw(train=steps, privacy={"noise_multiplier": 0.0, "max_grad_norm": 1e9, "accountant": "rdp",
                                    "noise_seed": 0})  # fmt: skip
    _, plain_reports = _fit(plain, rows, tmp_path / "plain", iters=2, prepare_model=privacy.freeze_embeddings)
    _, dp_reports = _fit(dp, rows, tmp_path / "dp", iters=2)
    assert dp_reports[-1][0]["privacy/epsilon"] == math.inf
    a, b = _weights(plain_reports[-1][1]), _weights(dp_reports[-1][1])
    assert a.keys() == b.keys() and not any("_embeddings." in k for k in a)
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 1e-5, moved
    before = _weights_at_init(dp)
    assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-3  # training moved the weights


def _weights_at_init(raw: dict) -> dict[str, torch.Tensor]:
    from fmdist import tasks

    cfg = from_dict(raw)
    freeze_labels(cfg, None)
    torch.manual_seed(cfg.train.seed)
    model = tasks.get(cfg.model.task).build_model(cfg)
    return {k: v.float() for k, v in model.state_dict().items() if "_embeddings." not in k}


def test_noise_is_applied_and_seeded(tmp_path):
    """The same q = 1 run with sigma 0.5: another noise seed gives other weights, the same seed the same."""
    rows = sentiment_rows(32, seed=6)

    def run(seed: int, name: str) -> dict[str, torch.Tensor]:
        raw = _raw(train={"max_steps": 1}, privacy={"noise_multiplier": 0.5, "accountant": "rdp", "noise_seed": seed})
        return _weights(_fit(raw, rows, tmp_path / name, iters=2)[1][-1][1])

    first, again, other = run(1, "a"), run(1, "b"), run(2, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert max((first[k] - other[k]).abs().max().item() for k in first) > 1e-4


def test_clipping_bounds_each_row_and_noise_shares_sum_to_the_right_variance():
    """One row's huge gradient is clipped to C, the others pass unchanged; 4 ranks' noise shares sum to
    N(0, sigma^2 C^2) per coordinate (fixed seed; 200k coordinates: the sample variance is within 1.5%)."""
    small = torch.randn(3, 5, 4) * 0.01
    huge = torch.full((1, 5, 4), 100.0)
    bias = torch.zeros(4, 4)
    clipped, norms = privacy.clip_per_sample([torch.cat([small, huge]), bias], max_grad_norm=1.0)
    assert norms[3].item() == pytest.approx(100.0 * math.sqrt(20), rel=1e-6)
    huge_clipped = clipped[0] - small.sum(0)
    assert huge_clipped.norm().item() == pytest.approx(1.0, rel=1e-5)
    alone, _ = privacy.clip_per_sample([small, bias[:3]], max_grad_norm=1.0)
    assert torch.allclose(alone[0], small.sum(0), atol=1e-7)  # rows within C are not scaled

    plan = privacy.PrivacyPlan(
        noise_multiplier=1.3, max_grad_norm=0.7, sample_rate=0.1, steps=1, delta=1e-5, accountant="rdp",
        expected_batch_size=10, num_rows=100,
    )  # fmt: skip
    shares = [
        privacy.noise_share(
            privacy.PrivateTraining(plan, None, [], ["w"], [torch.zeros(200_000)], rank=r, world_size=4, seed=7), step=3
        )[0]
        for r in range(4)
    ]
    assert not torch.equal(shares[0], shares[1])  # ranks draw independently
    assert shares[0].var().item() == pytest.approx((1.3 * 0.7) ** 2 / 4, rel=0.015)
    assert sum(shares).var().item() == pytest.approx((1.3 * 0.7) ** 2, rel=0.015)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """A 2-rank gloo group, a Linear(4, 2) in a DeepSpeed ZeRO-0 engine; rank 0's rows include one with a
    huge gradient. One DP step (sigma 0, C 1): every rank writes its reduced gradient."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = from_dict(_raw(scaling={"num_workers": 2}, train={"micro_batch_size": 2, "gradient_accumulation_steps": 1},
                         privacy={"noise_multiplier": 0.0, "max_grad_norm": 1.0}))  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    dp = privacy.setup(model, cfg, num_rows=8, steps=1, rank=rank, world_size=2)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
                "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0},
    )  # fmt: skip
    x, y = _rows_of_two_ranks()[rank]
    loss = torch.nn.functional.mse_loss(engine(x), y, reduction="none").sum(1).mean()
    privacy.backward(dp, engine, loss)
    privacy.finish_step(dp, engine, step=0)
    torch.save({n: p.grad for n, p in model.named_parameters()}, f"{out_dir}/grad{rank}.pt")


def _rows_of_two_ranks() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 4, generator=g) * 0.1, torch.randn(4, 2, generator=g) * 0.1
    x[0] = 1000.0  # the row whose gradient is huge (on rank 0)
    return [(x[:2], y[:2]), (x[2:], y[2:])]


@pytest.mark.slow  # two spawned processes importing DeepSpeed: about 15 s idle, 50 s on a loaded machine
def test_two_ranks_clip_each_row_before_the_all_reduce(tmp_path):
    """World size 2 (gloo, ZeRO-0): the reduced gradient equals (sum over all 4 rows of each row's gradient
    clipped to C) / 4, computed row by row in one process; clipping after the reduction would give another."""
    import torch.multiprocessing as mp

    mp.start_processes(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 2)
    rows = [(x[i : i + 1], y[i : i + 1]) for x, y in _rows_of_two_ranks() for i in range(2)]
    expected = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for x, y in rows:
        reference.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y, reduction="none").sum().backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in reference.parameters()))
        for n, p in reference.named_parameters():
            expected[n] += p.grad * min(1.0, 1.0 / (norm.item() + 1e-6))
    for name in expected:
        assert torch.allclose(grads[0][name], expected[name] / 4, atol=1e-6), name
        assert torch.equal(grads[0][name], grads[1][name])  # the all-reduce made the ranks agree
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[0].values()])).item() <= 4 / 4 + 1e-6


def test_config_errors_name_the_fields():
    base = _raw(privacy={"target_epsilon": 8.0})
    with pytest.raises(ConfigError) as err:
        from_dict({**base, "train": {**base["train"], "max_grad_norm": 1.0}})
    assert "train.max_grad_norm" in str(err.value) and "privacy.max_grad_norm" in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_dict({**base, "deepspeed": {"zero_stage": 2}})
    assert "deepspeed.zero_stage: 2" in str(err.value) and "deepspeed.zero_stage=0" in str(err.value)
    with pytest.raises(ConfigError, match="privacy.target_epsilon .* privacy.noise_multiplier"):
        from_dict(_raw(privacy={"target_epsilon": 8.0, "noise_multiplier": 1.0}))
    assert from_dict(base).train.max_grad_norm == 0.0  # per-sample clipping replaces the batch-level one
    assert from_dict(_raw()).train.max_grad_norm == 1.0  # DP off: untouched


def _one_word_rows(n: int, seed: int) -> dict[str, list]:
    """Sentences of one sentiment word repeated: a task a frozen random encoder's features separate."""
    rng = random.Random(seed)
    labels = [rng.randint(0, 1) for _ in range(n)]
    return {"sentence": [" ".join([rng.choice(POSITIVE if y else NEGATIVE)] * 6) for y in labels], "label": labels}


def test_lora_with_dp_clipping_and_poisson_sampling_learns(tmp_path):
    """peft LoRA under DP-SGD's per-sample clipping (C 1) and Poisson sampling (q = 0.1), sigma 0: per-sample
    gradients of the adapters and the head only, and the model learns (eval loss falls, accuracy above the
    0.64 majority). sigma > 0 is left to the tests above: on this tiny random encoder, Adam moves every
    noise-only coordinate by about lr per step and 50 steps do not learn (docs/privacy.md, Tuning)."""
    raw = _raw(
        train={"epochs": 5, "micro_batch_size": 16, "gradient_accumulation_steps": 1, "lr": 2e-2, "warmup_ratio": 0.0},
        peft={"method": "lora", "r": 4},
        privacy={"noise_multiplier": 0.0, "max_grad_norm": 1.0, "accountant": "rdp", "noise_seed": 0},
    )
    summary, reports = _fit(raw, _one_word_rows(160, 1), tmp_path, iters=10, eval_rows=_one_word_rows(64, 2))
    assert summary["step"] == 50 and reports[-1][0]["privacy/sample_rate"] == pytest.approx(0.1)
    assert summary["eval"]["accuracy"] >= 0.75, summary["eval"]
    assert reports[-1][0]["eval/loss"] < reports[0][0]["eval/loss"] - 0.1
    meta = json.loads((Path(reports[-1][1]) / "fmdist_state.json").read_text())
    assert meta["trainable_only"] and meta["privacy"]["max_grad_norm"] == 1.0
    assert all("lora_" in k or "classifier" in k for k in consolidated_state_dict(reports[-1][1]))
