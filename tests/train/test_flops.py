"""fmdist.train.flops: FLOPs per token against hand counts, ZeRO-3's partitioned parameters, the peak table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fmdist.train.flops import count_parameters, flops_per_token, model_flops_utilization, peak_flops

# 4 layers, hidden 128, GQA (2 KV heads of 32), vocab 1000, untied: bench/mfu.py's tiny preset.
TINY_LLAMA = dict(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# Embeddings 2 x 1000 x 128 = 256,000; per layer q 128x128 + k, v 128x64 each + o 128x128 = 49,152,
# MLP 3 x 128 x 344 = 132,096, two norms 256 -> 181,504 x 4 = 726,016; final norm 128.
TINY_LLAMA_PARAMS = 982_144


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


def test_llama_count_matches_a_hand_count():
    model = _tiny_llama()
    assert count_parameters(model) == TINY_LLAMA_PARAMS
    # 6 x 982,144 + 12 x 4 layers x 128 x 64 = 5,892,864 + 393,216
    assert flops_per_token(model, 64) == 6_286_080
    # The config alone needs N; the attention term grows with the sequence: + 12 x 4 x 128 x (2048 - 64).
    assert flops_per_token(model.config, 2048, n_params=TINY_LLAMA_PARAMS) == 6_286_080 + 12 * 4 * 128 * 1984


def test_gpt2_reads_n_layer_and_n_embd_and_counts_tied_embeddings_once():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    # wte 3,200 (the LM head shares it) + wpe 2,048 + 2 x (ln 64 + qkv 3,168 + proj 1,056 + ln 64 + fc 4,224
    # + proj 4,128) + ln_f 64 = 30,720
    assert count_parameters(model) == 30_720
    assert flops_per_token(model, 64) == 6 * 30_720 + 12 * 2 * 32 * 64
    # A config that spells the shape only GPT-2's way (no attribute map behind it).
    assert flops_per_token(SimpleNamespace(n_layer=2, n_embd=32), 64, n_params=30_720) == 233_472


def test_zero3_partitioned_parameters_count_at_full_size(tmp_path):
    """World size 1, gloo: ZeRO-3 leaves each parameter an empty placeholder; N must not fall to 0."""
    import deepspeed

    from fmdist.train.loop import _init_distributed

    _init_distributed(600)
    model = _tiny_llama()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}},
    )
    try:
        assert sum(p.numel() for p in engine.module.parameters()) < TINY_LLAMA_PARAMS  # partitioned away
        assert count_parameters(engine.module) == TINY_LLAMA_PARAMS
        assert flops_per_token(engine.module, 64) == 6_286_080
    finally:
        engine.destroy()


def test_a_model_without_transformer_shape_has_no_count():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    assert flops_per_token(cnn, 64) is None
    assert flops_per_token(SimpleNamespace(num_channels=3), 64, n_params=10) is None


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="pass n_params"):
        flops_per_token(SimpleNamespace(n_layer=2, n_embd=32), 64)
    with pytest.raises(ValueError, match="seq_len must be a positive"):
        flops_per_token(_tiny_llama(), 0)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # the SXM part's name
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", None),  # not the L4
        ("NVIDIA A10", None),  # not the A100
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops(name) == peak


def test_mfu_is_the_share_of_the_peak():
    # TinyLlama-1.1B's shape at 2048 tokens (7.708e9 FLOPs a token) at 50,000 tokens/s on an H100 SXM.
    assert model_flops_utilization(7_707_586_560, 50_000, 989e12) == pytest.approx(0.38967, abs=1e-5)
    assert model_flops_utilization(7_707_586_560, 50_000, None) is None
    assert model_flops_utilization(None, 50_000, 989e12) is None
