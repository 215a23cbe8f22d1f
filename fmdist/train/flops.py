"""Model FLOPs utilization (MFU): training FLOPs per token of a transformer, and a GPU's peak FLOP/s.

MFU = flops_per_token x tokens/s / peak FLOP/s. The count is LLM Foundry's (mosaicml/llm-foundry,
`MPTForCausalLM.flops_per_batch` in llmfoundry/models/mpt/modeling_mpt.py, per token): 6 N + 12
n_layers d_model seq_len, forward and backward, N = every parameter. Recomputation under activation
checkpointing is not counted: it is model FLOPs, not hardware FLOPs. Pure functions, so the loop, the
benchmarks and a notebook read each fact from one place.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets, which print the
# sparse figure with the footnote "with sparsity; specifications are one-half lower without": H100 SXM
# 1,979 -> 989 TFLOP/s (989.5, rounded down); H100 PCIe 1,513 -> 756; H200 SXM 1,979 -> 989; A100
# (SXM and PCIe) 624 -> 312; L4 242 -> 121. Matched in order, case-insensitively, as whole words of
# torch.cuda.get_device_name(): the "PCIe"/"NVL" variants before the bare name (the H100 SXM reports
# itself as "NVIDIA H100 80GB HBM3"), and "L4" does not match "L40S". None: a known name without a
# figure here (the NVL parts' sheets give other, revised figures), so MFU reads n/a rather than wrong.
PEAK_BF16_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", None),
    ("H100", 989e12),
    ("H200 NVL", None),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)

LAYER_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")
"""Hugging Face config attributes that hold the number of transformer blocks (Llama/BERT, GPT-2, T5)."""
WIDTH_ATTRS = ("hidden_size", "n_embd", "d_model")
"""Hugging Face config attributes that hold the residual stream's width."""


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU named as torch.cuda.get_device_name() names it; None if unknown."""
    for key, peak in PEAK_BF16_FLOPS:
        if re.search(rf"\b{re.escape(key)}\b", device_name, flags=re.IGNORECASE):
            return peak
    return None


def _first_attr(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def count_parameters(model: torch.nn.Module) -> int:
    """Every parameter, trainable or frozen, each shared tensor once (tied embeddings count once).

    Under ZeRO-3 a parameter's local tensor is an empty placeholder; DeepSpeed keeps its full size in
    `ds_numel`, which is what counts here.
    """
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def flops_per_token(model: torch.nn.Module | Any, seq_len: int, n_params: int | None = None) -> int | None:
    """Training FLOPs per token (forward + backward) of a transformer: 6 N + 12 n_layers d_model seq_len.

    6 N counts the parameter matmuls (2 N forward, 4 N backward: activation and weight gradients);
    12 n_layers d_model seq_len the attention scores and the attention-weighted values (QK^T and AV,
    each 2 d_model seq_len per token forward, x3 with backward). N includes the embeddings, as LLM
    Foundry counts it (the input embedding is a lookup, so that overcounts by 6 x its size), and frozen
    weights (PEFT), whose weight-gradient matmuls do not run (so MFU reads high there).

    Args:
        model: a model (its `.config` gives the shape, its parameters N) or a Hugging Face config.
        seq_len: tokens each token attends over: the packed block or padded row length.
        n_params: N; required with a config (a config does not say its parameter count), else counted.

    Returns:
        The count, or None for a model that is not a transformer: its config names no layer count
        (num_hidden_layers, n_layer, num_layers) or width (hidden_size, n_embd, d_model), e.g. a CNN.

    Raises:
        ValueError: `seq_len` is not positive, or a config came without `n_params`.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len!r}.")
    config = getattr(model, "config", None) if isinstance(model, torch.nn.Module) else model
    n_layers, d_model = _first_attr(config, LAYER_ATTRS), _first_attr(config, WIDTH_ATTRS)
    if n_layers is None or d_model is None:
        return None
    if n_params is None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"flops_per_token: a config ({type(config).__name__}) does not say how many parameters its model "
                "has; pass n_params, or pass the model itself."
            )
        n_params = count_parameters(model)
    return 6 * n_params + 12 * n_layers * d_model * seq_len


def model_flops_utilization(
    flops_per_token: int | None, tokens_per_s: float, peak_flops_per_s: float | None
) -> float | None:
    """MFU as a fraction (0.45 is 45%); None when either the count or the peak is unknown."""
    if flops_per_token is None or not peak_flops_per_s:
        return None
    return flops_per_token * tokens_per_s / peak_flops_per_s
