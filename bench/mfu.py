"""MFU of a 1.1B Llama-style decoder on one GPU: bare PyTorch vs bare DeepSpeed ZeRO-0/2/3, checkpointing off and on.

Trains a decoder built from a config (TinyLlama-1.1B's shape, random weights, random tokens, no download)
at sequence length 2048 in bf16 and prints tokens/s, model FLOPs utilization (MFU) and peak GPU memory
for each variant. Every cell builds its model in a fresh process. Only the ZeRO-2 vs bare PyTorch
comparison is interleaved (ABAB.., `--rounds` rounds, median and spread of the ratio); the other cells
run once.

    python bench/mfu.py --out results/          # one CUDA GPU, DeepSpeed installed
    python bench/mfu.py --tiny                  # ~1M parameters, sequence 64, CPU, fp32 (the tests' model)

Precision. Bare PyTorch: fp32 weights, gradients and AdamW state, forward and backward under
torch.autocast(bf16). DeepSpeed: `"bf16": {"enabled": true}`, i.e. bf16 weights and gradients with fp32
master weights and AdamW state kept by DeepSpeed's optimizer wrapper (at stage 0 its unfused
mixed-precision wrapper, at stages 2 and 3 the ZeRO optimizer). Both step torch.optim.AdamW
(fused=True on CUDA) and clip gradients at norm 1.0. On CPU (`--tiny`) everything is fp32: bf16
matrix products are slow or missing on many CPUs, and the CPU path only checks that the loops train.

MFU = FLOPs per token x tokens/s / peak dense bf16 FLOP/s of the device, with LLM Foundry's
FLOPs per token = 6 N + 12 n_layers d_model seq_len, N = every parameter, both embedding matrices
included (the input embedding is a lookup, so this counts ~6 x 65.5M FLOPs per token that no
kernel does). Recomputation under activation checkpointing is not counted (it is model FLOPs, not
hardware FLOPs). Unknown device or CPU: MFU n/a.

fmdist's own loop is not measured here: it cannot train a causal LM until model.task causal-lm exists.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MAX_GRAD_NORM = 1.0
FMDIST_NOT_MEASURED = "fmdist loop: not measured; needs model.task causal-lm"

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, matched in order as substrings
# of torch.cuda.get_device_name(): "H100 PCIe" and "H100 NVL" before the bare "H100" (the SXM part
# reports itself as "NVIDIA H100 80GB HBM3"). None: a known name with no figure here, so MFU is n/a.
PEAK_BF16_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", None),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


@dataclass(frozen=True)
class Preset:
    """A model shape and the batch it is benchmarked with."""

    llama: dict
    """LlamaConfig keyword arguments."""
    seq_len: int
    """Tokens per sequence."""
    micro_batch_size: int
    """Sequences per optimizer step (one micro-batch, no accumulation), the same for every variant."""


PRESETS = {
    # TinyLlama-1.1B's shape: 1,100,048,384 parameters. (hidden 2048 with 16 layers would be 0.95B.)
    "1.1b": Preset(
        llama=dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
        seq_len=2048,
        # The largest power of two that fits 80 GB in every cell: bare torch without checkpointing
        # peaked at 56.6 GiB on an H100 80GB (fp32 weights, grads and AdamW state, fp32 residual stream).
        micro_batch_size=8,
    ),
    "tiny": Preset(
        llama=dict(
            vocab_size=1000,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        seq_len=64,
        micro_batch_size=4,
    ),
}


@dataclass(frozen=True)
class Cell:
    """One benchmarked variant."""

    loop: str
    """"torch" (plain model + AdamW) or "deepspeed" (deepspeed.initialize)."""
    zero_stage: int | None
    """ZeRO stage for the DeepSpeed loop; None for the torch loop."""
    checkpointing: bool
    """Activation checkpointing of every decoder layer (transformers' activation_checkpointing_enable)."""

    @property
    def name(self) -> str:
        loop = "bare torch" if self.loop == "torch" else f"DeepSpeed ZeRO-{self.zero_stage}"
        return f"{loop}, ckpt {'on' if self.checkpointing else 'off'}"


@dataclass
class CellResult:
    """What one cell measured."""

    cell: Cell
    tokens_per_s: float
    step_s: float
    peak_memory_gib: float | None
    """torch.cuda.max_memory_allocated over set-up and steps; None on CPU."""
    losses: list[float] = field(default_factory=list)
    """Loss of every step, warm-up included."""


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a CUDA device name, or None when the table does not know it."""
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), LLM Foundry's formula.

    6 N for the parameter matmuls (2 forward, 4 backward) plus 12 n_layers d_model seq_len for the
    attention scores and the attention-weighted values (QK^T and AV, each 2 d_model seq_len per
    token forward, x3 with backward).
    """
    return 6 * n_params + 12 * n_layers * d_model * seq_len


def attention_implementation() -> str:
    """flash_attention_2 when the flash-attn package is installed, else PyTorch SDPA."""
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def build_model(preset: Preset, device: torch.device, checkpointing: bool, attn: str) -> torch.nn.Module:
    """The decoder with fp32 weights on `device`, the same random weights on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**preset.llama, attn_implementation=attn, use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    # Built on the device directly: initializing 1.1B parameters on the CPU takes longer than the benchmark.
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if checkpointing:
        # Non-reentrant: the reentrant variant needs inputs that require grad and breaks with ZeRO-3.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def ds_config(zero_stage: int, micro_batch_size: int, bf16: bool, on_gpu: bool) -> dict:
    """A bare DeepSpeed config: one rank, no accumulation, the settings fmdist's builder would pick."""
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size,
        "gradient_clipping": MAX_GRAD_NORM,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_distributed(device: torch.device) -> None:
    """A one-rank process group for DeepSpeed (nccl on CUDA, gloo on CPU), unless one exists."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def _torch_step(model: torch.nn.Module, lr: float, device: torch.device, bf16: bool) -> Callable:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")

    def step(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        # Returns the norm as a tensor and scales on the device: no host sync.
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _deepspeed_step(
    model: torch.nn.Module, zero_stage: int, micro_batch_size: int, lr: float, device: torch.device, bf16: bool
) -> tuple[Callable, object]:
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # after import: DeepSpeed sets INFO
    init_distributed(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
    config = ds_config(zero_stage, micro_batch_size, bf16, device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def step(batch: torch.Tensor) -> torch.Tensor:
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step, engine


def run_cell(
    cell: Cell,
    preset: Preset,
    batches: torch.Tensor,
    warmup_steps: int,
    timed_steps: int,
    device: torch.device,
    bf16: bool,
    lr: float,
    attn: str = "sdpa",
) -> CellResult:
    """Build a fresh model and optimizer, run warm-up then timed steps over `batches` (cycled).

    Args:
        batches: int64 token ids of shape (n, micro_batch_size, seq_len) on `device`; step i uses
            batches[i % n], so n = 1 repeats one batch.
    """
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build_model(preset, device, cell.checkpointing, attn)
    engine = None
    if cell.loop == "torch":
        step = _torch_step(model, lr, device, bf16)
    else:
        step, engine = _deepspeed_step(model, cell.zero_stage, preset.micro_batch_size, lr, device, bf16)

    losses = []
    for i in range(warmup_steps + timed_steps):
        if i == warmup_steps:
            if on_cuda:
                torch.cuda.synchronize()  # host-device sync: warm-up work must not leak into the timing
            t0 = time.perf_counter()
        losses.append(step(batches[i % len(batches)]))
    if on_cuda:
        torch.cuda.synchronize()  # host-device sync: wait for the last step's kernels
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None
    result = CellResult(
        cell=cell,
        tokens_per_s=timed_steps * batches.shape[1] * batches.shape[2] / elapsed,
        step_s=elapsed / timed_steps,
        peak_memory_gib=peak,
        losses=torch.stack(losses).float().tolist(),  # host-device sync, after the timing
    )
    # Free this cell's model, optimizer state and engine: the tests run several cells in one process.
    if engine is not None:
        engine.destroy()
    del step, engine, model
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def random_batches(vocab_size: int, n: int, micro_batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """`n` micro-batches of uniformly random token ids, the same on every call."""
    gen = torch.Generator(device=device).manual_seed(1)
    return torch.randint(vocab_size, (n, micro_batch_size, seq_len), generator=gen, device=device)


def _cell_process(
    cell: Cell,
    preset: Preset,
    n_batches: int,
    warmup_steps: int,
    timed_steps: int,
    device_type: str,
    bf16: bool,
    lr: float,
    attn: str,
) -> CellResult | str:
    """run_cell in a child process; a failure becomes a string, so one broken cell ends only itself."""
    device = torch.device(device_type)
    if device.type == "cpu":
        torch.set_num_threads(1)  # see main()
    batches = random_batches(preset.llama["vocab_size"], n_batches, preset.micro_batch_size, preset.seq_len, device)
    try:
        return run_cell(cell, preset, batches, warmup_steps, timed_steps, device, bf16, lr, attn)
    except torch.OutOfMemoryError:
        return "OOM"
    except Exception as err:  # any DeepSpeed or model failure
        return f"failed: {type(err).__name__}: {str(err)[:200]}"


def _spread(values: list[float], fmt: str = ".3f") -> str:
    """Median, range, and spread = (max - min) / median."""
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med
    return f"median {med:{fmt}}, min {min(values):{fmt}}, max {max(values):{fmt}}, spread {spread:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="~1M-parameter preset, sequence 64, on the CPU, fp32")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="sequences per step (default: preset's)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per cell, after warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of ZeRO-2 vs bare torch")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--no-deepspeed", action="store_true", help="bare torch cells only")
    parser.add_argument("--out", type=Path, default=None, help="folder for mfu.txt and mfu.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.warmup_steps < 0:
        parser.error("--rounds and --steps must be >= 1 and --warmup-steps >= 0")

    preset = PRESETS["tiny" if args.tiny else "1.1b"]
    if args.micro_batch_size is not None:
        preset = Preset(preset.llama, preset.seq_len, args.micro_batch_size)
    if args.tiny:
        device, bf16 = torch.device("cpu"), False
        # A 1M-parameter model gains nothing from intra-op threads; on a loaded 2-core machine a
        # second OpenMP thread made a step ~100x slower (spinning against the other load).
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device, bf16 = torch.device("cuda"), True
    else:
        raise SystemExit("no CUDA device: the 1.1B benchmark needs one GPU; run with --tiny for the CPU path")
    # DeepSpeed picks its accelerator at import: say which, rather than let it probe.
    os.environ.setdefault("DS_ACCELERATOR", device.type)

    import transformers

    try:
        import deepspeed

        ds_version = deepspeed.__version__
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # after import: DeepSpeed sets INFO
    except ImportError as err:
        if not args.no_deepspeed:
            raise SystemExit(f"DeepSpeed is not importable ({err}): install it, or pass --no-deepspeed") from err
        ds_version = "not installed"

    attn = attention_implementation() if device.type == "cuda" else "sdpa"
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})"
    peak = peak_flops(device_name) if device.type == "cuda" else None
    model = build_model(preset, torch.device("meta"), False, attn)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    del model
    cfg = preset.llama
    fpt = flops_per_token(n_params, cfg["num_hidden_layers"], cfg["hidden_size"], preset.seq_len)

    log = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        log = (args.out / "mfu.txt").open("w")

    def say(text: str = "") -> None:
        print(text, flush=True)
        if log is not None:  # line by line: a run cut short still leaves what it measured
            log.write(text + "\n")
            log.flush()

    say(
        f"device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {ds_version}"
    )
    say(
        f"model: Llama-style, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads, intermediate "
        f"{cfg['intermediate_size']}, vocab {cfg['vocab_size']}: {n_params:,} parameters "
        f"({n_embed:,} in the input embedding and LM head, untied)"
    )
    say(
        f"seq {preset.seq_len}, micro batch {preset.micro_batch_size} sequences "
        f"({preset.seq_len * preset.micro_batch_size} tokens/step), attention {attn}, "
        f"{'bf16 (torch: autocast over fp32 weights; DeepSpeed: bf16 config)' if bf16 else 'fp32'}, "
        f"fused AdamW: {device.type == 'cuda'}"
    )
    say(
        f"FLOPs/token = 6N + 12*L*d*seq = {fpt:.4e} (N includes embeddings); peak "
        f"{f'{peak:.3e} FLOP/s' if peak else 'unknown: MFU n/a'}"
    )
    say(
        f"{args.warmup_steps} warm-up + {args.steps} timed steps per cell, each cell in a fresh process; {args.rounds} interleaved rounds"
    )

    n_batches = args.warmup_steps + args.steps
    # One fresh process per cell (spawned: CUDA cannot fork): no cell inherits another's cached
    # allocator blocks, leftover ZeRO-3 hooks or peak-memory counter.
    spawn = multiprocessing.get_context("spawn")

    def run(cell: Cell) -> CellResult | str:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            res = pool.submit(
                _cell_process, cell, preset, n_batches, args.warmup_steps, args.steps, device.type, bf16, args.lr, attn
            ).result()
        if isinstance(res, str):
            say(f"  {cell.name}: {res}")
            return res
        mem = f"{res.peak_memory_gib:.1f} GiB" if res.peak_memory_gib is not None else "n/a"
        say(
            f"  {cell.name}: {res.tokens_per_s:,.0f} tokens/s, {res.step_s * 1e3:.0f} ms/step, peak {mem}, "
            f"loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}"
        )
        return res

    torch_off = Cell("torch", None, False)
    zero2_off = Cell("deepspeed", 2, False)
    results: dict[Cell, list[CellResult | str]] = {}
    # Interleaved A/B: drift of clocks, temperature or the host hits both loops alike.
    pair = (torch_off,) if args.no_deepspeed else (torch_off, zero2_off)
    for r in range(args.rounds):
        say(f"round {r + 1}")
        for cell in pair:
            results.setdefault(cell, []).append(run(cell))
    say("single cells")
    others = [Cell("torch", None, True)]
    if not args.no_deepspeed:
        # ZeRO-3 last: its parameter hooks and coordinator are the likeliest to outlive an engine.
        others += [Cell("deepspeed", 0, False), Cell("deepspeed", 0, True), Cell("deepspeed", 2, True)]
        others += [Cell("deepspeed", 3, False), Cell("deepspeed", 3, True)]
    for cell in others:
        results[cell] = [run(cell)]

    def rate(cell: Cell) -> float | None:
        ok = [r.tokens_per_s for r in results.get(cell, []) if isinstance(r, CellResult)]
        return statistics.median(ok) if ok else None

    say()
    say(FMDIST_NOT_MEASURED)
    say()
    header = f"{'variant':<30}{'micro':>6}{'tokens/s':>11}{'MFU':>8}{'peak GiB':>10}{'/ torch':>9}{'/ ZeRO-0':>10}"
    say(header)
    order = [torch_off, Cell("torch", None, True)]
    if not args.no_deepspeed:
        order += [Cell("deepspeed", s, c) for s in (0, 2, 3) for c in (False, True)]
    order = sorted(order, key=lambda c: (c.checkpointing, c.loop != "torch", c.zero_stage or 0))
    for cell in order:
        tps = rate(cell)
        ok = [r for r in results[cell] if isinstance(r, CellResult)]
        if tps is None:
            say(f"{cell.name:<30}{preset.micro_batch_size:>6}  {results[cell][0]}")
            continue
        mfu = f"{fpt * tps / peak:.1%}" if peak else "n/a"
        mem = f"{max(r.peak_memory_gib for r in ok):.1f}" if ok[0].peak_memory_gib is not None else "n/a"
        base_torch = rate(Cell("torch", None, cell.checkpointing))
        base_zero0 = rate(Cell("deepspeed", 0, cell.checkpointing))
        vs_torch = f"{tps / base_torch:.3f}" if base_torch else "-"
        vs_zero0 = f"{tps / base_zero0:.3f}" if base_zero0 and cell.loop == "deepspeed" else "-"
        note = f" (median of {len(ok)})" if len(results[cell]) > 1 else ""
        say(
            f"{cell.name:<30}{preset.micro_batch_size:>6}{tps:>11,.0f}{mfu:>8}{mem:>10}{vs_torch:>9}{vs_zero0:>10}{note}"
        )

    if not args.no_deepspeed:
        pairs = [
            (a.tokens_per_s, b.tokens_per_s)
            for a, b in zip(results[torch_off], results[zero2_off], strict=True)
            if isinstance(a, CellResult) and isinstance(b, CellResult)
        ]
        if pairs:
            say()
            say(f"ZeRO-2 / bare torch (ckpt off), {len(pairs)} interleaved rounds:")
            say("  per round: " + ", ".join(f"{b / a:.3f}" for a, b in pairs))
            say("  ratio " + _spread([b / a for a, b in pairs]))
            say("  bare torch tokens/s " + _spread([a for a, _ in pairs], ",.0f"))
            say("  ZeRO-2 tokens/s " + _spread([b for _, b in pairs], ",.0f"))

    if args.out is not None:
        records = [
            {**asdict(r), "cell": asdict(cell), "name": cell.name}
            if isinstance(r, CellResult)
            else {"name": cell.name, "result": r}
            for cell, rs in results.items()
            for r in rs
        ]
        meta = {
            "device": device_name,
            "n_params": n_params,
            "flops_per_token": fpt,
            "peak_flops": peak,
            "preset": asdict(preset),
        }
        (args.out / "mfu.json").write_text(json.dumps({"meta": meta, "runs": records}, indent=1))
        log.close()


if __name__ == "__main__":
    main()
