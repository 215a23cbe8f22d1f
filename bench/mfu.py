"""MFU of a 1.1B Llama-style decoder on one GPU: fmdist's loop vs bare DeepSpeed ZeRO-0/2/3 vs bare PyTorch.

Trains a decoder built from a config (TinyLlama-1.1B's shape, random weights, random tokens, no download)
at sequence length 2048 in bf16 and prints tokens/s, model FLOPs utilization (MFU) and peak GPU memory
for each variant, with activation checkpointing off and on. Every cell builds its model in a fresh
process. Only the ZeRO-2 comparison (bare torch, bare DeepSpeed, fmdist, checkpointing off) is
interleaved (ABCABC.., `--rounds` rounds, median and spread of the ratios); the other cells run once.

    python bench/mfu.py --out results/          # one CUDA GPU, DeepSpeed installed
    python bench/mfu.py --tiny                  # ~1M parameters, sequence 64, CPU, fp32 (the tests' model)

The cells. Bare torch: the model, torch.optim.AdamW, clip_grad_norm_. Bare DeepSpeed: the same model
and AdamW through `deepspeed.initialize` with the JSON fmdist's builder would write. fmdist: the
library's own loop, `fmdist.train.loop.fit`, in this process on one rank (no Ray: a launcher only
starts fit on each worker), `model.task: causal-lm` building the same model from a config directory
written here (a LlamaConfig and a word-level tokenizer over the same ids, so nothing is downloaded),
fed the same random token ids as packed blocks through LoopIO. Its set-up (model build on the CPU,
DeepSpeed init) and its end (fmdist always writes a checkpoint when training ends, about 15 GB for the
1.1B model, into `--scratch-dir`, then deleted) are outside the timed window, as they are for the bare
loops. Every cell: no weight decay (fmdist exempts norms, the bare loops would not), constant LR,
gradient clipping at 1.0, the same initial weights (seed 0) and the same batches.

Precision. Bare PyTorch: fp32 weights, gradients and AdamW state, forward and backward under
torch.autocast(bf16). DeepSpeed and fmdist: `"bf16": {"enabled": true}` (fmdist's `deepspeed.precision:
bf16`), i.e. bf16 weights and gradients with fp32 master weights and AdamW state kept by DeepSpeed's
optimizer wrapper (at stage 0 its unfused mixed-precision wrapper, at stages 2 and 3 the ZeRO
optimizer). All step torch.optim.AdamW with fused=True on CUDA (fmdist's loop passes it there). On
CPU (`--tiny`) everything is fp32: bf16 matrix products are slow or missing on many CPUs, and the CPU
path only checks that the loops train, and train alike.

MFU = FLOPs per token x tokens/s / peak dense bf16 FLOP/s of the device, both from fmdist.train.flops:
LLM Foundry's FLOPs per token = 6 N + 12 n_layers d_model seq_len, N = every parameter, both embedding
matrices included (the input embedding is a lookup, so this counts ~6 x 65.5M FLOPs per token that no
kernel does). Recomputation under activation checkpointing is not counted (it is model FLOPs, not
hardware FLOPs). Unknown device or CPU: MFU n/a.
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
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/mfu.py` from a checkout, fmdist installed or not

from fmdist.train.flops import flops_per_token, model_flops_utilization, peak_flops  # noqa: E402

MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 0.0
"""No decay in any cell: fmdist's loop exempts biases and norms, a bare AdamW would decay them too."""
INIT_SEED = 0
"""Seeds every cell's initial weights (fmdist's train.seed), so the cells start from the same model."""
LOOPS = ("torch", "deepspeed", "fmdist")


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
    """"torch" (plain model + AdamW), "deepspeed" (deepspeed.initialize) or "fmdist" (fmdist.train.loop.fit)."""
    zero_stage: int | None
    """ZeRO stage for the DeepSpeed and fmdist loops; None for the torch loop."""
    checkpointing: bool
    """Activation checkpointing of every decoder layer (transformers' activation_checkpointing_enable)."""

    @property
    def name(self) -> str:
        loop = {"torch": "bare torch", "deepspeed": "DeepSpeed", "fmdist": "fmdist"}[self.loop]
        if self.zero_stage is not None:
            loop += f" ZeRO-{self.zero_stage}"
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


def format_mfu(fpt: int | None, tokens_per_s: float, peak: float | None) -> str:
    """The MFU column: a percentage, or n/a where the device's peak (or the model's count) is unknown."""
    mfu = model_flops_utilization(fpt, tokens_per_s, peak)
    return "n/a" if mfu is None else f"{mfu:.1%}"


def attention_implementation() -> str:
    """flash_attention_2 when the flash-attn package is installed, else PyTorch SDPA."""
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def llama_config(preset: Preset, attn: str | None = None) -> object:
    """The decoder's LlamaConfig: untied embeddings, no KV cache (training only)."""
    from transformers import LlamaConfig

    kwargs = {"attn_implementation": attn} if attn else {}
    return LlamaConfig(**preset.llama, use_cache=False, tie_word_embeddings=False, **kwargs)


def build_model(preset: Preset, device: torch.device, checkpointing: bool, attn: str) -> torch.nn.Module:
    """The decoder with fp32 weights on `device`, the same random weights on every call."""
    from transformers import LlamaForCausalLM

    config = llama_config(preset, attn)
    torch.manual_seed(INIT_SEED)
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
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")

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
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
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
    scratch_dir: str | None = None,
) -> CellResult:
    """Build a fresh model and optimizer, run warm-up then timed steps over `batches` (cycled).

    Args:
        batches: int64 token ids of shape (n, micro_batch_size, seq_len) on `device`; step i uses
            batches[i % n], so n = 1 repeats one batch.
        scratch_dir: where the fmdist cell writes its model directory and final checkpoint (a
            temporary folder inside it, deleted afterwards); None: the system's temporary folder.
    """
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    if cell.loop == "fmdist":
        return run_fmdist_cell(cell, preset, batches, warmup_steps, timed_steps, device, bf16, lr, attn, scratch_dir)
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


def write_model_dir(preset: Preset, directory: Path) -> Path:
    """The preset as a model directory that fmdist's causal-lm task builds from: the LlamaConfig (no
    weights, so the task builds a fresh model) and a word-level tokenizer over the same ids.

    The tokenizer never encodes anything (the rows arrive as token ids); the task loads one as its
    processor and pads with its pad id. Made here from nothing, so no hub download is needed.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    config = llama_config(preset)
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    special = {"unk_token": "<0>", "pad_token": "<0>"}
    special.update(bos_token=f"<{config.bos_token_id}>", eos_token=f"<{config.eos_token_id}>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<0>")), **special)
    tokenizer.save_pretrained(directory)
    config.save_pretrained(directory)
    return directory


def fmdist_config(
    cell: Cell, preset: Preset, max_steps: int, lr: float, bf16: bool, attn: str, model_dir: Path, scratch: Path
) -> object:
    """fmdist's config for the cell: the bare loops' settings in fmdist's terms, one worker."""
    from fmdist.config import from_dict

    return from_dict(
        {
            "model": {
                "name_or_path": str(model_dir),
                "task": "causal-lm",
                "from_config": {"attn_implementation": attn},
            },
            # Never read: the loop takes its rows from LoopIO.train_batches, which bench/mfu.py feeds.
            "data": {"train": "random token ids from bench/mfu.py", "max_length": preset.seq_len},
            "train": {
                "max_steps": max_steps,
                "micro_batch_size": preset.micro_batch_size,
                "lr": lr,
                "lr_schedule": "constant",
                "warmup_ratio": 0.0,
                "weight_decay": WEIGHT_DECAY,
                "max_grad_norm": MAX_GRAD_NORM,
                "seed": INIT_SEED,
            },
            "deepspeed": {
                "zero_stage": cell.zero_stage,
                "precision": "bf16" if bf16 else "fp32",
                "gradient_checkpointing": cell.checkpointing,
            },
            "scaling": {"num_workers": 1},
            "run": {"name": "mfu-fmdist", "storage_path": str(scratch)},
        }
    )


def run_fmdist_cell(
    cell: Cell,
    preset: Preset,
    batches: torch.Tensor,
    warmup_steps: int,
    timed_steps: int,
    device: torch.device,
    bf16: bool,
    lr: float,
    attn: str,
    scratch_dir: str | None,
) -> CellResult:
    """fmdist's own loop (`fit`, in-process, one rank) over the same batches as packed causal-lm rows.

    The loop runs warm-up + timed + 1 steps: the timed window runs from when it asks for batch
    `warmup_steps` to when it asks for batch `warmup_steps + timed_steps`, each after a device
    sync, so it spans exactly the timed steps with all the loop's own work between them (collate,
    host-to-device copies, its per-iter all-reduce, log lines). The extra step and the checkpoint
    fmdist writes at the end fall outside it. The loss of every step is read from the model's output.
    """
    from fmdist.tasks.language_modeling import PACKED_COLUMN
    from fmdist.train.loop import LoopIO, fit

    on_cuda = device.type == "cuda"
    n_steps = warmup_steps + timed_steps
    # Rows as the causal-lm task's packing writes them: one block of token ids per row, and the
    # characters it covers (none: these ids were never text). Made before the loop, as a stream's are.
    rows = [{PACKED_COLUMN: b.tolist(), "chars": [0] * len(b)} for b in batches.cpu()]
    marks: dict[str, float] = {}

    def train_batches(epoch: int):
        for i in range(n_steps + 1):
            if i in (warmup_steps, n_steps):
                if on_cuda:
                    torch.cuda.synchronize()  # host-device sync: no step in flight at either end of the window
                marks["start" if i == warmup_steps else "end"] = time.perf_counter()
                if i == n_steps and on_cuda:
                    marks["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            yield rows[i % len(rows)]

    losses: list[torch.Tensor] = []
    hooks = []

    def record_loss(module: torch.nn.Module, args: tuple, output: object) -> None:
        if module.training:  # not a placeholder or evaluation forward
            losses.append(output.loss.detach())

    def find_model(module: torch.nn.Module, args: tuple) -> None:
        # The loop builds the model itself; its first forward hands it over, then this global hook goes.
        if type(module).__name__ == "LlamaForCausalLM":
            hooks.append(module.register_forward_hook(record_loss))
            finder.remove()

    with tempfile.TemporaryDirectory(prefix="mfu-fmdist-", dir=scratch_dir) as tmp:
        model_dir = write_model_dir(preset, Path(tmp) / "model")
        cfg = fmdist_config(cell, preset, n_steps + 1, lr, bf16, attn, model_dir, Path(tmp) / "runs")
        io = LoopIO(
            train_batches=train_batches,
            iters_per_epoch=lambda epoch: n_steps + 1,
            num_train_rows=(n_steps + 1) * preset.micro_batch_size,
            report=lambda metrics, path: None,
            scratch_dir=str(Path(tmp) / "scratch"),
        )
        finder = torch.nn.modules.module.register_module_forward_pre_hook(find_model)
        try:
            fit(cfg, io)
        finally:
            finder.remove()
            for hook in hooks:
                hook.remove()
    elapsed = marks["end"] - marks["start"]
    result = CellResult(
        cell=cell,
        tokens_per_s=timed_steps * batches.shape[1] * batches.shape[2] / elapsed,
        step_s=elapsed / timed_steps,
        peak_memory_gib=marks.get("peak_gib"),
        losses=torch.stack(losses[:n_steps]).float().tolist(),
    )
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
    scratch_dir: str | None,
) -> CellResult | str:
    """run_cell in a child process; a failure becomes a string, so one broken cell ends only itself."""
    device = torch.device(device_type)
    if device.type == "cpu":
        torch.set_num_threads(1)  # see main()
    batches = random_batches(preset.llama["vocab_size"], n_batches, preset.micro_batch_size, preset.seq_len, device)
    try:
        return run_cell(cell, preset, batches, warmup_steps, timed_steps, device, bf16, lr, attn, scratch_dir)
    except torch.OutOfMemoryError:
        return "OOM"
    except Exception as err:  # any DeepSpeed, fmdist or model failure
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
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of bare torch, DeepSpeed, fmdist")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--no-deepspeed", action="store_true", help="bare torch cells only (fmdist needs DeepSpeed)")
    parser.add_argument("--no-single", action="store_true", help="only the interleaved ZeRO-2 rounds")
    parser.add_argument("--scratch-dir", default=None, help="for fmdist's end-of-run checkpoint (default: temp dir)")
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
    from fmdist.runtime import use_one_ninja

    # The children inherit PATH: every cell, fmdist's included, builds DeepSpeed's CPU ops with one ninja.
    use_one_ninja()

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
    fpt = flops_per_token(model, preset.seq_len)
    del model
    cfg = preset.llama

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
        f"{'bf16 (torch: autocast over fp32 weights; DeepSpeed, fmdist: bf16 config)' if bf16 else 'fp32'}, "
        f"fused AdamW: {device.type == 'cuda'}"
    )
    say(
        f"FLOPs/token = 6N + 12*L*d*seq = {fpt:.4e} (N includes embeddings); peak "
        f"{f'{peak:.3e} FLOP/s' if peak else 'unknown: MFU n/a'}"
    )
    say(
        f"{args.warmup_steps} warm-up + {args.steps} timed steps per cell, each cell in a fresh process; "
        f"{args.rounds} interleaved rounds"
    )
    if not args.no_deepspeed:
        say("fmdist: fmdist.train.loop.fit in-process (one rank, no Ray), model.task causal-lm, packed random blocks")

    n_batches = args.warmup_steps + args.steps
    # One fresh process per cell (spawned: CUDA cannot fork): no cell inherits another's cached
    # allocator blocks, leftover ZeRO-3 hooks or peak-memory counter.
    spawn = multiprocessing.get_context("spawn")

    def run(cell: Cell) -> CellResult | str:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            res = pool.submit(
                _cell_process, cell, preset, n_batches, args.warmup_steps, args.steps, device.type, bf16, args.lr,
                attn, args.scratch_dir,
            ).result()  # fmt: skip
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
    fmdist2_off = Cell("fmdist", 2, False)
    results: dict[Cell, list[CellResult | str]] = {}
    # Interleaved ABC: drift of clocks, temperature or the host hits every loop alike.
    group = (torch_off,) if args.no_deepspeed else (torch_off, zero2_off, fmdist2_off)
    for r in range(args.rounds):
        say(f"round {r + 1}")
        for cell in group:
            results.setdefault(cell, []).append(run(cell))
    others = [] if args.no_single else [Cell("torch", None, True)]
    if not args.no_deepspeed and not args.no_single:
        # ZeRO-3 last: its parameter hooks and coordinator are the likeliest to outlive an engine.
        for loop in ("deepspeed", "fmdist"):
            others += [Cell(loop, 0, False), Cell(loop, 0, True), Cell(loop, 2, True)]
        others += [Cell(loop, 3, ckpt) for loop in ("deepspeed", "fmdist") for ckpt in (False, True)]
    if others:
        say("single cells")
    for cell in others:
        results[cell] = [run(cell)]

    def rate(cell: Cell) -> float | None:
        ok = [r.tokens_per_s for r in results.get(cell, []) if isinstance(r, CellResult)]
        return statistics.median(ok) if ok else None

    say()
    header = (
        f"{'variant':<30}{'micro':>6}{'tokens/s':>11}{'MFU':>8}{'peak GiB':>10}{'/ torch':>9}{'/ ZeRO-0':>10}"
        f"{'/ DeepSpeed':>13}"
    )
    say(header)
    order = sorted(results, key=lambda c: (c.checkpointing, LOOPS.index(c.loop), c.zero_stage or 0))
    for cell in order:
        tps = rate(cell)
        ok = [r for r in results[cell] if isinstance(r, CellResult)]
        if tps is None:
            say(f"{cell.name:<30}{preset.micro_batch_size:>6}  {results[cell][0]}")
            continue
        mem = f"{max(r.peak_memory_gib for r in ok):.1f}" if ok[0].peak_memory_gib is not None else "n/a"
        base_torch = rate(Cell("torch", None, cell.checkpointing))
        base_zero0 = rate(Cell(cell.loop, 0, cell.checkpointing))
        base_ds = rate(Cell("deepspeed", cell.zero_stage, cell.checkpointing))
        vs_torch = f"{tps / base_torch:.3f}" if base_torch else "-"
        vs_zero0 = f"{tps / base_zero0:.3f}" if base_zero0 and cell.loop != "torch" else "-"
        vs_ds = f"{tps / base_ds:.3f}" if base_ds and cell.loop == "fmdist" else "-"
        note = f" (median of {len(ok)})" if len(results[cell]) > 1 else ""
        say(
            f"{cell.name:<30}{preset.micro_batch_size:>6}{tps:>11,.0f}{format_mfu(fpt, tps, peak):>8}{mem:>10}"
            f"{vs_torch:>9}{vs_zero0:>10}{vs_ds:>13}{note}"
        )

    def interleaved(label: str, base: Cell, other: Cell) -> None:
        """Per-round ratios of `other` to `base`: both ran in the same round, back to back."""
        pairs = [
            (a.tokens_per_s, b.tokens_per_s)
            for a, b in zip(results[base], results[other], strict=True)
            if isinstance(a, CellResult) and isinstance(b, CellResult)
        ]
        if not pairs:
            return
        say()
        say(f"{label} (ckpt off), {len(pairs)} interleaved rounds:")
        say("  per round: " + ", ".join(f"{b / a:.3f}" for a, b in pairs))
        say("  ratio " + _spread([b / a for a, b in pairs]))
        say(f"  {base.name} tokens/s " + _spread([a for a, _ in pairs], ",.0f"))
        say(f"  {other.name} tokens/s " + _spread([b for _, b in pairs], ",.0f"))

    if not args.no_deepspeed:
        interleaved("ZeRO-2 / bare torch", torch_off, zero2_off)
        interleaved("fmdist / bare DeepSpeed, both ZeRO-2", zero2_off, fmdist2_off)

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
