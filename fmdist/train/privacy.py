"""Differentially private fine-tuning (DP-SGD): Poisson-sampled steps, per-sample clipping, Gaussian noise, accounting.

The loop calls this module at four points: `setup` (freeze embeddings, attach Opacus's per-sample
gradient hooks, settle the noise multiplier), `poisson_batches` (each epoch's micro-batches),
`backward` (each micro-batch: per-sample gradients, clipped and summed on this rank) and `finish_step`
(each optimizer step: this rank's share of the noise, then the one all-reduce). `metrics` gives the
privacy spent so far for every report. docs/privacy.md explains the design and why the accounting holds.

Why the pieces are where they are:
- Opacus computes per-sample gradients (`GradSampleHooks`, its non-wrapping mode: the model stays the
  same module, so DeepSpeed, checkpoints and export see no wrapper) and does the accounting (RDP or PRV).
  Clipping and noise are a few lines here: Opacus's DPOptimizer reduces gradients itself and knows
  nothing of DeepSpeed's engine, which owns the all-reduce, the optimizer step and the LR schedule.
- Clipping must happen before the cross-rank reduction (a reduced gradient mixes every rank's rows), so
  the micro-batches' backward runs under `engine.no_sync()` and the step's single all-reduce is issued
  here, once the clipped sums and the noise are in `p.grad`. That is DeepSpeed ZeRO-0; ZeRO-1/2/3
  reduce or partition gradients inside backward, so config.py refuses them under DP.
- Noise is split across ranks: each adds N(0, sigma^2 C^2 / world_size), so the summed noise has the
  variance sigma^2 C^2 of one Gaussian mechanism on the global sum, and no rank is special.
- The sum is divided by the expected global batch (q x n), not the realised one (a data-dependent
  number), as Opacus does under Poisson sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fmdist.config import Config
from fmdist.tasks import Rows


def enabled(cfg: Config) -> bool:
    """Whether `cfg` asks for DP-SGD (`privacy.target_epsilon` or `privacy.noise_multiplier` is set)."""
    return cfg.privacy.enabled


@dataclass(frozen=True)
class PrivacyPlan:
    """The numbers the guarantee rests on, fixed before the first step and recorded with every report."""

    noise_multiplier: float
    """sigma: the noise's standard deviation in units of `max_grad_norm`."""
    max_grad_norm: float
    """C: every row's gradient is clipped to this L2 norm (over all trainable parameters)."""
    sample_rate: float
    """q: the probability that a training row enters a step's batch (expected global batch / rows)."""
    steps: int
    """The run's optimizer steps (the accountant's composition count when the run ends)."""
    delta: float
    accountant: str
    """Opacus accountant: rdp or prv."""
    expected_batch_size: int
    """q x rows = the global batch size: the normaliser of every step's gradient."""
    num_rows: int
    target_epsilon: float | None = None


def with_poisson_plan(cfg: Config, io: Any) -> Any:
    """The loop's LoopIO with the step plan of Poisson sampling: ceil(rows / global batch) steps an epoch.

    An epoch under DP is one expected pass over the rows (q x rows = the global batch per step). The
    stream's plan counts the busiest rank's micro-batches instead, which with uneven shards (a rank that
    owns more rows) would be more steps, spending privacy budget on passes nobody asked for.
    """
    steps = math.ceil(io.num_train_rows / cfg.global_batch_size)
    iters = steps * cfg.train.gradient_accumulation_steps
    return dataclasses.replace(io, iters_per_epoch=lambda epoch: iters)


def make_plan(cfg: Config, num_rows: int, steps: int) -> PrivacyPlan:
    """The plan for a run of `steps` optimizer steps over `num_rows` training rows.

    With `privacy.target_epsilon`, the noise multiplier is the smallest one Opacus's accountant finds
    for (target_epsilon, delta) after `steps` steps at this sample rate.

    Raises:
        ValueError: the global batch is larger than the training set (a sample rate above 1).
    """
    p = cfg.privacy
    batch = cfg.global_batch_size
    if batch > num_rows:
        raise ValueError(
            f"privacy: the global batch ({batch} = train.micro_batch_size x gradient_accumulation_steps x "
            f"scaling.num_workers) is larger than the {num_rows} training rows, a sample rate above 1; lower "
            "train.micro_batch_size or train.gradient_accumulation_steps."
        )
    sample_rate = batch / num_rows
    delta = p.delta if p.delta is not None else 1 / (2 * num_rows)
    sigma = p.noise_multiplier
    if sigma is None:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(
            target_epsilon=p.target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=p.accountant,
            epsilon_tolerance=0.01,
        )
    return PrivacyPlan(
        noise_multiplier=float(sigma),
        max_grad_norm=p.max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=p.accountant,
        expected_batch_size=batch,
        num_rows=num_rows,
        target_epsilon=p.target_epsilon,
    )


@functools.lru_cache(maxsize=64)
def spent_epsilon(plan: PrivacyPlan, steps: int) -> float:
    """epsilon spent after `steps` steps of the plan, from Opacus's accountant (inf without noise).

    Cached: the PRV accountant takes about a second, and every report asks.
    """
    if steps == 0:
        return 0.0
    if plan.noise_multiplier == 0:
        return math.inf
    from opacus.accountants import create_accountant

    accountant = create_accountant(plan.accountant)
    accountant.history = [(plan.noise_multiplier, plan.sample_rate, steps)]
    return float(accountant.get_epsilon(delta=plan.delta))


def metrics(plan: PrivacyPlan, steps: int) -> dict[str, float]:
    """The privacy figures every report carries (hence metrics.json, the log summary and the card)."""
    return {
        "privacy/epsilon": spent_epsilon(plan, steps),
        "privacy/delta": plan.delta,
        "privacy/noise_multiplier": plan.noise_multiplier,
        "privacy/sample_rate": plan.sample_rate,
        "privacy/steps": steps,
        "privacy/max_grad_norm": plan.max_grad_norm,
    }


def record(plan: PrivacyPlan, steps: int) -> dict[str, Any]:
    """The plan and the spent epsilon as plain values, for checkpoint metadata and the model card."""
    return {**asdict(plan), "steps_taken": steps, "epsilon": spent_epsilon(plan, steps)}


@dataclass
class PrivateTraining:
    """One rank's DP-SGD state: the hooks, the per-step sums of clipped gradients, the randomness."""

    plan: PrivacyPlan
    hooks: Any
    """Opacus's GradSampleHooks on the model (kept alive: they fill `p.grad_sample` in backward)."""
    params: list[torch.nn.Parameter]
    names: list[str]
    """The trainable parameters' names, for errors."""
    sums: list[torch.Tensor]
    """Per trainable parameter: this step's sum of clipped per-sample gradients on this rank."""
    rank: int
    world_size: int
    seed: int
    """Root of the sampling and noise randomness: privacy.noise_seed, or this rank's OS entropy."""


def freeze_embeddings(model: torch.nn.Module) -> int:
    """Freeze every nn.Embedding (word, position, token-type); returns how many weights were frozen.

    Opacus's per-sample gradient of an embedding is dense, batch x vocabulary x hidden (47 MB per row
    for MiniLM), and DP fine-tuning results are as good without training them (docs/privacy.md).
    """
    frozen = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad:
            module.weight.requires_grad_(False)
            frozen += 1
    return frozen


def setup(
    model: torch.nn.Module, cfg: Config, num_rows: int, steps: int, rank: int, world_size: int
) -> PrivateTraining:
    """Prepare `model` for DP-SGD (before the optimizer and the DeepSpeed engine are built).

    Raises:
        ValueError: a model Opacus cannot compute per-sample gradients for (BatchNorm and other layers
            whose buffers mix rows of a batch), or a global batch larger than the data.
    """
    from opacus.grad_sample import GradSampleHooks

    if cfg.privacy.freeze_embeddings:
        freeze_embeddings(model)
    try:
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
    except NotImplementedError as exc:
        raise ValueError(
            f"privacy: Opacus cannot compute per-sample gradients for {type(model).__name__}: {exc}. Layers whose "
            "buffers mix the rows of a batch (BatchNorm) break per-sample clipping; use GroupNorm/LayerNorm, or "
            "train that layer frozen (peft)."
        ) from None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    seed = cfg.privacy.noise_seed if cfg.privacy.noise_seed is not None else secrets.randbits(62)
    return PrivateTraining(
        plan=make_plan(cfg, num_rows, steps),
        hooks=hooks,
        params=params,
        names=[n for n, _ in named],
        sums=[torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
        rank=rank,
        world_size=world_size,
        seed=seed,
    )


def _columns(share: Iterable[Rows | None]) -> dict[str, list]:
    """This rank's share of an epoch's rows, as columns (placeholders dropped)."""
    columns: dict[str, list] = {}
    for batch in share:
        if batch is None:
            continue
        for name, values in batch.items():
            columns.setdefault(name, []).extend(values)
    return columns


def poisson_batches(
    dp: PrivateTraining, share: Iterable[Rows | None], epoch: int, first_step: int, steps: int, accumulation: int
) -> Iterator[Rows | None]:
    """The epoch's micro-batches under Poisson sampling: `accumulation` per step for steps first_step..steps-1.

    `share` is this rank's part of the epoch's rows (data/stream.py: disjoint across ranks, together
    every row once). For each step, every row of the share enters independently with probability q;
    the ranks' draws are independent, so each step's global batch is a Poisson sample of the whole
    training set: the sampling Opacus's accountant assumes. The rank's draw is cut into `accumulation`
    micro-batches of about equal size (around train.micro_batch_size, varying as the draw does); an
    empty one is a placeholder (None), so every rank runs the same number of iters per step.

    The rows are held in memory for the epoch (the rank's share). A resumed run continues at
    `first_step`: Poisson steps are independent, so nothing before it needs replaying.
    """
    rows = _columns(share)
    n = len(next(iter(rows.values()))) if rows else 0
    for step in range(first_step, steps):
        rng = np.random.default_rng([dp.seed, 1, epoch, step, dp.rank])
        chosen = np.flatnonzero(rng.random(n) < dp.plan.sample_rate)
        for part in np.array_split(chosen, accumulation):
            yield {name: [values[i] for i in part] for name, values in rows.items()} if len(part) else None


def clip_per_sample(grad_samples: list[torch.Tensor], max_grad_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip each row's gradient (over all parameters together) to L2 norm `max_grad_norm` and sum over rows.

    Args:
        grad_samples: per parameter, the per-sample gradients, batch first.
        max_grad_norm: C.

    Returns:
        Per parameter the sum of clipped per-sample gradients, and each row's norm before clipping.
    """
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=1) for g in grad_samples], dim=1).norm(2, dim=1)
    # Opacus's factor: min(1, C / norm); a row already within C keeps its gradient exactly.
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor.to(g.dtype), g) for g in grad_samples], norms


def backward(dp: PrivateTraining, engine: Any, loss: torch.Tensor) -> None:
    """One real micro-batch: per-sample gradients (Opacus's hooks), clipped and added to this rank's sums.

    No collective: DeepSpeed's gradient all-reduce is held back (`no_sync`) until `finish_step`, so
    clipping sees this rank's rows alone. The loss must be the mean over the micro-batch's rows (the
    hooks multiply by the batch size to get each row's own gradient); config.py allows DP only for
    tasks whose loss is.
    """
    with engine.no_sync(), warnings.catch_warnings():
        # Frozen embeddings mean no input of the first hooked layer needs a gradient; torch warns, harmlessly.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine.backward(loss)
    # engine.backward divides by gradient_accumulation_steps (through the loss, or in 0.19 through hooks on
    # the model's outputs even with scale_wrt_gas=False); undone here so that C bounds each row's own gradient.
    accumulation = engine.gradient_accumulation_steps()
    grad_samples = [p.grad_sample if p.grad_sample is None else p.grad_sample * accumulation for p in dp.params]
    rows = max(len(g) for g in grad_samples if g is not None)
    for name, sample in zip(dp.names, grad_samples, strict=True):
        if sample is None or len(sample) != rows:
            raise ValueError(
                f"privacy: {name} has no per-sample gradient for each of the {rows} rows "
                f"({'none' if sample is None else f'batch {len(sample)}'}): the layer is shared by the rows (a "
                "position embedding broadcast over the batch) or unused. Keep privacy.freeze_embeddings true, or "
                "freeze that parameter."
            )
    clipped, _ = clip_per_sample(grad_samples, dp.plan.max_grad_norm)
    for total, part in zip(dp.sums, clipped, strict=True):
        total += part
    for p in dp.params:
        p.grad_sample = None
        p.grad = None  # the batch-mean gradient autograd also left here is not private; finish_step sets p.grad


def noise_share(dp: PrivateTraining, step: int) -> list[torch.Tensor]:
    """This rank's noise for `step`: N(0, sigma^2 C^2 / world_size) per coordinate, seeded by (seed, step, rank)."""
    std = dp.plan.noise_multiplier * dp.plan.max_grad_norm / math.sqrt(dp.world_size)
    device = dp.sums[0].device if dp.sums else torch.device("cpu")
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([dp.seed, 2, step, dp.rank]).generate_state(1, np.uint64)[0] >> 1))
    return [torch.normal(0.0, std, size=s.shape, generator=generator, device=device, dtype=s.dtype) for s in dp.sums]


def finish_step(dp: PrivateTraining, engine: Any, step: int) -> None:
    """End of an optimizer step: p.grad = (clipped sum + this rank's noise) x W / B, then the all-reduce.

    DeepSpeed averages gradients over the W ranks, so the reduced gradient is (sum of every rank's
    clipped rows + the ranks' noise, total variance sigma^2 C^2) / B, B the expected global batch.
    Collective: one all-reduce of the gradients (DeepSpeed's bucketed all-reduce, ZeRO-0).
    """
    scale = dp.world_size / dp.plan.expected_batch_size
    noises = noise_share(dp, step) if dp.plan.noise_multiplier > 0 else [None] * len(dp.sums)
    for p, total, noise in zip(dp.params, dp.sums, noises, strict=True):
        p.grad = ((total if noise is None else total + noise) * scale).to(p.dtype)
        total.zero_()
    if dist.get_world_size() > 1:
        engine.allreduce_gradients()
