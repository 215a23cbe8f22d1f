"""peft adapters: only adapters and the new head train, ZeRO-2/3 keep the frozen base out of the optimizer (and
partitioned under ZeRO-3), and the trained values merge offline into a plain model that predicts what the engine did.

World size 1, in-process (gloo); a tiny BERT sequence classifier built from its config, seeded so that a "fresh
base" equals the one training wrapped. Each ZeRO stage's run is trained once per module.
"""

from __future__ import annotations

import os
import socket

import deepspeed
import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.integrations import is_deepspeed_zero3_enabled

from fmdist.config import Config, from_dict
from fmdist.train import adapters

BERT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
NUM_LABELS = 3
RANK = 4
TRAIN_STEPS = 3


def _cfg(method: str = "lora", task: str = "sequence-classification", zero_stage: int = 2, **peft) -> Config:
    return from_dict(
        {
            "data": {"train": "unused-by-these-tests"},
            "deepspeed": {"zero_stage": zero_stage},
            "model": {"task": task, "num_labels": NUM_LABELS},
            "peft": {"method": method, "r": RANK, "alpha": 8.0, "dropout": 0.0, **peft},
        }
    )


def _base() -> BertForSequenceClassification:
    """The same weights on every call: what training wraps and what merging starts from."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT, num_labels=NUM_LABELS))


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 100, (4, 6), generator=g),
        "attention_mask": torch.ones(4, 6, dtype=torch.long),
        "labels": torch.randint(0, NUM_LABELS, (4,), generator=g),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def process_group() -> None:
    """World size 1 (gloo); reuses a group that an earlier test in this process started."""
    if not dist.is_initialized():
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="gloo")
    assert dist.get_world_size() == 1


def _engine(model: torch.nn.Module, zero_stage: int, bf16: bool = False) -> deepspeed.DeepSpeedEngine:
    # The optimizer sees only what trains: ZeRO then keeps no fp32 master or Adam state for the frozen base.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    config = {
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        # Persistence 0: tiny parameters would otherwise stay gathered after their first forward (default 1e5).
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _gathered(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """The engine's own working copy of the trainable parameters (ZeRO-3: gathered for the occasion)."""
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.data.detach().clone() for n, p in params.items()}


@pytest.fixture(scope="module")
def trained(process_group):
    """zero stage -> (engine, state before training, trainable_state_dict after TRAIN_STEPS), trained once."""
    runs: dict[int, tuple] = {}

    def get(zero_stage: int) -> tuple:
        if zero_stage not in runs:
            engine = _engine(adapters.apply(_base(), _cfg(zero_stage=zero_stage), total_steps=TRAIN_STEPS), zero_stage)
            before = adapters.trainable_state_dict(engine.module)
            engine.train()
            for step in range(TRAIN_STEPS):
                engine.backward(engine(**_batch(step)).loss)
                engine.step()
            runs[zero_stage] = engine, before, adapters.trainable_state_dict(engine.module)
        return runs[zero_stage]

    return get


def test_lora_trains_only_adapters_and_head():
    base = _base()
    base_total = sum(p.numel() for p in base.parameters())
    head = sum(p.numel() for p in base.classifier.parameters())
    model = adapters.apply(base, _cfg(), total_steps=TRAIN_STEPS)

    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all(".lora_A." in n or ".lora_B." in n or "classifier.modules_to_save" in n for n in trainable), trainable
    assert any("classifier.modules_to_save" in n for n in trainable), "the new head does not train"
    # query and value of each layer: A (r x hidden) and B (hidden x r).
    lora = BERT["num_hidden_layers"] * 2 * 2 * RANK * BERT["hidden_size"]
    assert sum(trainable.values()) == lora + head
    # The wrapper adds the adapters and a trainable copy of the head next to the frozen original.
    assert adapters.parameter_counts(model) == (lora + head, base_total + lora + head)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_optimizer_holds_only_the_trainable_params(trained, zero_stage):
    engine, _, _ = trained(zero_stage)
    reference = adapters.apply(_base(), _cfg(), total_steps=TRAIN_STEPS)
    n_trainable, n_total = adapters.parameter_counts(reference)
    assert adapters.parameter_counts(engine.module) == (n_trainable, n_total)

    optimizer = engine.optimizer
    if zero_stage == 3:
        fp32, padding = optimizer.fp32_partitioned_groups_flat, 0
        # Outside a forward the frozen base holds no data on this rank: nothing was gathered for good.
        frozen = [p for p in engine.module.parameters() if not p.requires_grad]
        assert frozen and all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in frozen)
        assert all(p.data.numel() == 0 for p in frozen)
    else:  # ZeRO-2 pads each group's flat buffer to its alignment
        fp32, padding = optimizer.single_partition_of_fp32_groups, sum(optimizer.groups_padding)
    assert sum(t.numel() for t in fp32) - padding == n_trainable < n_total


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_trainable_state_dict_is_what_the_engine_trained(trained, zero_stage):
    engine, before, after = trained(zero_stage)
    shapes = {
        n: p.shape for n, p in adapters.apply(_base(), _cfg(), total_steps=1).named_parameters() if p.requires_grad
    }
    assert {n: t.shape for n, t in after.items()} == shapes
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in after.values())
    assert all(not torch.equal(before[n], after[n]) for n in after), "some trainable parameter did not change"
    working = _gathered(engine)
    for name, value in after.items():
        torch.testing.assert_close(value, working[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_trainable_state_dict_is_the_fp32_master_under_bf16(process_group, zero_stage):
    engine = _engine(adapters.apply(_base(), _cfg(zero_stage=zero_stage), total_steps=2), zero_stage, bf16=True)
    for step in range(2):
        engine.backward(engine(**_batch(step)).loss)
        engine.step()
    values = adapters.trainable_state_dict(engine.module)
    working = _gathered(engine)
    assert all(w.dtype == torch.bfloat16 for w in working.values())
    for name, value in values.items():
        assert value.dtype == torch.float32
        assert torch.equal(value.bfloat16(), working[name]), name  # the working copy is this, rounded
    # ... and not the working copy itself: the optimizer's master carries more bits than bf16 holds.
    assert any(not torch.equal(v, v.bfloat16().float()) for n, v in values.items() if ".lora_B." in n)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_merged_model_predicts_what_the_engine_did(trained, zero_stage, tmp_path):
    engine, _, after = trained(zero_stage)
    batch = _batch(100)
    engine.eval()
    with torch.no_grad():
        expected = engine(**batch).logits

    merged = adapters.merged_model(_base(), _cfg(), after).eval()
    assert type(merged) is BertForSequenceClassification
    assert set(merged.state_dict()) == set(_base().state_dict())  # no lora_*, base_layer or modules_to_save keys
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)

    merged.save_pretrained(tmp_path)
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, expected, rtol=0, atol=1e-5)


def test_save_adapter_round_trips(trained, tmp_path):
    from peft import PeftModel

    engine, _, after = trained(3)
    batch = _batch(101)
    engine.eval()
    with torch.no_grad():
        expected = engine(**batch).logits

    adapters.save_adapter(_base(), _cfg(), after, str(tmp_path))
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(_base(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-5)


def test_merged_model_refuses_trainable_values_that_do_not_fit():
    values = adapters.trainable_state_dict(adapters.apply(_base(), _cfg(), total_steps=1))
    dropped = next(iter(values))
    with pytest.raises(ValueError, match="missing") as raised:
        adapters.merged_model(_base(), _cfg(), {k: v for k, v in values.items() if k != dropped})
    assert dropped in str(raised.value)
    with pytest.raises(ValueError, match=r"unexpected \['base_model.model.extra'\]"):
        adapters.merged_model(_base(), _cfg(), {**values, "base_model.model.extra": torch.zeros(1)})


def test_ia3_trains_under_zero3(process_group):
    engine = _engine(adapters.apply(_base(), _cfg("ia3", zero_stage=3), total_steps=TRAIN_STEPS), 3)
    before = adapters.trainable_state_dict(engine.module)
    assert before and all(".ia3_l." in n or "classifier.modules_to_save" in n for n in before), sorted(before)
    engine.train()
    loss = engine(**_batch(0)).loss
    engine.backward(loss)
    engine.step()
    after = adapters.trainable_state_dict(engine.module)
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[n], after[n]) for n in before), "some IA3 vector or head did not change"


@pytest.mark.parametrize("zero_stage", [None, 2, 3])
def test_adalora_allocates_ranks_each_step(process_group, zero_stage):
    """AdaLoRA prunes singular values (lora_E) to its budget at each after_step, also inside a ZeRO engine."""
    total_steps = 4
    model = adapters.apply(_base(), _cfg("adalora", zero_stage=zero_stage or 0), total_steps=total_steps)
    module = model
    if zero_stage is None:  # plain torch: peft's own path
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    else:
        engine = _engine(model, zero_stage)
        module = engine.module
    tuner = module.base_model
    adalora = tuner.peft_config["default"]
    before = adapters.trainable_state_dict(module)
    module.train()
    for step in range(1, total_steps):
        loss = (engine if zero_stage is not None else model)(**_batch(step)).loss
        assert torch.isfinite(loss)
        if zero_stage is None:
            loss.backward()
        else:
            engine.backward(loss)
        adapters.after_step(module, step)  # while the step's gradients exist
        # Pruned singular values are zero in what the optimizer updates next (its fp32 master under ZeRO).
        values = adapters.trainable_state_dict(module)
        assert adalora.rank_pattern, "no rank allocation happened"
        pruned = 0
        for name, keep in adalora.rank_pattern.items():
            keep = torch.tensor(keep)
            lora_e = values[f"base_model.model.{name}"].flatten()
            assert torch.all(lora_e[~keep] == 0), name
            pruned += int((~keep).sum())
        assert pruned > 0, "the budget schedule pruned nothing"
        if zero_stage is None:
            optimizer.step()
            optimizer.zero_grad()
        else:
            engine.step()
    after = adapters.trainable_state_dict(module)
    assert any(not torch.equal(before[n], after[n]) for n in before if ".lora_A." in n)
    assert not is_deepspeed_zero3_enabled(), "the ZeRO-3 flag for AdaLoRA's forward leaked out of it"


def test_unknown_target_modules_are_named_with_the_fix():
    with pytest.raises(ValueError, match=r"peft\.target_modules: \['nope'\]") as raised:
        adapters.apply(_base(), _cfg(target_modules=["query", "nope"]), total_steps=1)
    assert "'query'" in str(raised.value) and "'value'" in str(raised.value)  # real names to pick from


@pytest.mark.parametrize(
    ("task", "build", "inputs", "target_modules", "head"),
    [
        ("masked-lm", lambda: BertForMaskedLM(BertConfig(**BERT)), "tokens", None, None),
        (
            "causal-lm",
            lambda: GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)),
            "tokens",
            None,
            None,
        ),
        (
            "token-classification",
            lambda: BertForTokenClassification(BertConfig(**BERT, num_labels=NUM_LABELS)),
            "tags",
            None,
            "classifier",
        ),
        (
            "image-classification",
            lambda: ConvNextForImageClassification(
                ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=NUM_LABELS)
            ),
            "images",
            ["pwconv1", "pwconv2"],
            "classifier",
        ),
    ],
)
def test_every_task_keeps_its_output_and_trains_its_new_head(task, build, inputs, target_modules, head):
    g = torch.Generator().manual_seed(0)
    if inputs == "images":
        batch = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.tensor([0, 2])}
    else:
        ids = torch.randint(1, 100, (2, 5), generator=g)
        batch = {"input_ids": ids, "labels": ids if inputs == "tokens" else torch.zeros_like(ids)}
    torch.manual_seed(0)
    model = adapters.apply(build(), _cfg(task=task, target_modules=target_modules), total_steps=1)
    output = model(**batch)  # the model's own ModelOutput, whatever peft class wraps it
    assert output.loss is not None and torch.isfinite(output.loss) and output.logits is not None

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = [n for n in trainable if ".lora_A." in n or ".lora_B." in n]
    head_copies = [n for n in trainable if f"{head}.modules_to_save" in n] if head else []
    assert adapted and sorted(adapted + head_copies) == sorted(trainable), trainable
    assert bool(head_copies) == bool(head)
