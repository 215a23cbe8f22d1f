"""The DeepSpeed JSON derived from a config."""

from __future__ import annotations

from fmdist.config import from_dict
from fmdist.train.ds_config import build_ds_config


def test_batch_sizes_are_derived_once():
    cfg = from_dict({"data": {"train": "x"}, "train": {"micro_batch_size": 4, "gradient_accumulation_steps": 3}})
    ds = build_ds_config(cfg, world_size=5, on_gpu=False)
    assert ds["train_batch_size"] == 4 * 3 * 5
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3


def test_zero3_offload_and_precision():
    cfg = from_dict(
        {
            "data": {"train": "x"},
            "deepspeed": {
                "zero_stage": 3,
                "offload_optimizer": "cpu",
                "offload_params": "cpu",
                "precision": "bf16",
                "extra": {"zero_optimization": {"reduce_bucket_size": 1000}},
            },
        }
    )
    ds = build_ds_config(cfg, world_size=2, on_gpu=True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 1000  # extra merged in, siblings kept
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "zero_force_ds_cpu_optimizer" not in ds
    assert build_ds_config(cfg, world_size=2, on_gpu=False)["zero_force_ds_cpu_optimizer"] is False
