"""Config -> DeepSpeed JSON: the only place the DeepSpeed settings are derived."""

from __future__ import annotations

import copy
from typing import Any

from fmdist.config import Config


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_ds_config(cfg: Config, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run on `world_size` ranks.

    The optimizer and LR scheduler are passed to `deepspeed.initialize` as objects (see
    train/loop.py), so they are not in this JSON; DeepSpeed still saves and restores their state.
    """
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # Overlapping communication with backward needs CUDA streams; on CPU it only adds copies.
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True)
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.zero_stage == 3:
        # Export consolidates from the fp32 shards (zero_to_fp32), so no 16-bit gather at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        # fmdist prints its own progress (rank 0); DeepSpeed's per-step prints would interleave.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer == "cpu" and not on_gpu:
        # DeepSpeed insists on its compiled CPUAdam with offload; on a CPU-only machine the
        # optimizer already runs on the CPU, so torch's AdamW is equivalent and needs no build.
        out["zero_force_ds_cpu_optimizer"] = False
    return _merge(out, ds.extra)
