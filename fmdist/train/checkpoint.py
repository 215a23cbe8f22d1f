"""Checkpoints: save and load a run's state on every rank, find the newest, consolidate the weights.

A checkpoint directory holds:
- `ds/`: DeepSpeed's own files (every rank's ZeRO shard, the optimizer and LR scheduler states);
- `rng_rank{r}.json`, `data_rank{r}.json` and `data_rank{r}_slot{j}.arrow`: each rank's RNG and
  stream position (its shuffle windows as Arrow tables), never pickles, so loading cannot run code;
- `fmdist_state.json` (rank 0): step, epoch, world size, ZeRO stage, the effective config (with its
  frozen label set) and the eval metrics;
- `hf/` (rank 0): the model config and the processor (tokenizer or image processor), for export;
- `manifest_rank{r}.json`: the size and sha256 of every file rank r wrote, written last.

A checkpoint counts only when complete: every rank's manifest is there and every file it lists
matches (`problems`). Ray uploads a checkpoint's files in no set order, so no single file written
last can say that the rest arrived.

A checkpoint resumes on another worker count when the count divides its *slots* (workers x gradient
accumulation, data/stream.py): `resume_layout` keeps the slots, and so the global batch and every
row's place in the epoch, by changing the accumulation; `load` then gives each new rank the stream
positions of the slots it now owns, and DeepSpeed's ZeRO partitions are re-cut through its universal
checkpoint (fp32 weights, Adam moments and step; the LR schedule and fmdist's state come along).

A checkpoint must not be able to run code: every torch file in it is read inside
`weights_only_loads`, DeepSpeed's own loads included (see there).

Every function takes what it needs as arguments; nothing here knows about Ray or the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from fmdist.config import Config
from fmdist.data.fs import filesystem
from fmdist.runtime import get_logger

DS_TAG = "ds"
STATE_FILE = "fmdist_state.json"
HF_DIR = "hf"
CHECKPOINT_PREFIX = "checkpoint_step_"
MANIFEST_PREFIX = "manifest_rank"
FORCE_WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

log = get_logger("fmdist")


def _deepspeed_safe_types() -> list[type]:
    """The non-tensor types that DeepSpeed 0.19 pickles into its checkpoint files, and nothing else.

    Each is plain data: the weights-only unpickler makes it with `cls.__new__` plus a `__dict__`
    update (the dataclass and the loss scalers, none of which defines `__setstate__`) or, for the
    int enum, a lookup by value, so none can run code while loading. Found by saving ZeRO-0/1/2/3
    checkpoints (fp32, bf16, optimizer offload; fp16 on a GPU) and listing what the weights-only
    unpickler refuses:
    - `ZeroStageEnum`: the stage, in every ZeRO-1/2/3 optimizer-states file;
    - `fragment_address` (numel, start): ZeRO-1/2 and the bf16 optimizer's parameter slice map;
    - `LossScaler`: ZeRO-1/2/3 save their loss scaler object (a static scale of 1 unless fp16);
    - `DynamicLossScaler`: the same object under fp16 with dynamic scaling (fmdist's fp16 config,
      GPU only; `CreateLossScaler` in deepspeed/runtime/fp16/loss_scaler.py).
    Never add a callable that can reach code (builtins, `functools.partial`, `os`, `subprocess`).
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def _refused_files(directory: str) -> list[str]:
    """Torch files under `directory` that hold globals outside the allowlist, each with those globals.

    Read statically (the pickle's opcodes are listed, never executed); call it with the allowlist active.
    """
    refused = []
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (ValueError, RuntimeError, OSError):
            unsafe = ["not a torch.save zip archive, so it cannot be checked"]
        if unsafe:
            refused.append(f"{path} ({', '.join(unsafe)})")
    return refused


@contextlib.contextmanager
def weights_only_loads(directory: str) -> Iterator[None]:
    """Every `torch.load` inside, DeepSpeed's included, unpickles tensors and allowlisted types only.

    DeepSpeed's `load_checkpoint` and `zero_to_fp32` call `torch.load(..., weights_only=False)`, which
    runs whatever a planted pickle asks for. PyTorch reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call
    and then uses its weights-only unpickler even where the caller passed `weights_only=False`; the
    opposite variable is lifted meanwhile (torch refuses both at once). The environment is the
    process's, so a `torch.load` on another thread meanwhile is held to weights-only too, which is
    only stricter. A refused load raises a RuntimeError naming the files and globals, never a fallback.
    """
    saved = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY_ENV, _FORCE_NO_WEIGHTS_ONLY_ENV)}
    os.environ[FORCE_WEIGHTS_ONLY_ENV] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_types()):
            try:
                yield
            except pickle.UnpicklingError as exc:
                reason = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
                files = _refused_files(directory) or [
                    f"a file in {directory} ({reason.group(1) if reason else str(exc).splitlines()[0]})"
                ]
                raise RuntimeError(
                    f"checkpoint {directory} was refused for safety: {'; '.join(files)} holds objects other "
                    "than tensors and the plain types DeepSpeed saves, and unpickling them could run code. "
                    "Delete this checkpoint and resume from an older one (or train again); do not load it "
                    "with weights_only=False unless you know who wrote it."
                ) from exc
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _save_data_state(directory: Path, rank: int, data_state: dict[str, Any]) -> None:
    """The stream position as JSON, and each slot's shuffle-window rows as an Arrow table."""
    slots = []
    for j, slot in enumerate(data_state["slots"]):
        window, columns = slot["window"], slot["columns"]
        table = pa.table({c: [row[i] for row in window] for i, c in enumerate(columns)})
        with pa.OSFile(str(directory / f"data_rank{rank}_slot{j}.arrow"), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        slots.append({k: v for k, v in slot.items() if k != "window"})
    (directory / f"data_rank{rank}.json").write_text(json.dumps({"slots": slots}))


def _load_data_state(directory: Path, rank: int) -> dict[str, Any] | None:
    state = json.loads((directory / f"data_rank{rank}.json").read_text())
    if state is None:
        return None  # written by a caller without a stream (in-process tests, benchmarks)
    for j, slot in enumerate(state["slots"]):
        with pa.memory_map(str(directory / f"data_rank{rank}_slot{j}.arrow")) as source:
            table = pa.ipc.open_file(source).read_all()
        columns = [table.column(c).to_pylist() for c in slot["columns"]] if table.num_rows else []
        slot["window"] = list(zip(*columns, strict=True)) if columns else []
    return state


def save(
    engine: Any,
    directory: str,
    state: dict[str, Any],
    meta: dict[str, Any],
    processor: Any,
    data_state: dict[str, Any] | None,
) -> str:
    """Every rank writes its DeepSpeed shard, RNG and stream position; rank 0 the metadata and `hf/`.

    Collective: DeepSpeed barriers inside `save_checkpoint`; each rank writes only its own files.
    """
    rank = dist.get_rank()
    path = Path(directory)
    # Frozen weights (a peft base model) are not saved: resuming and export rebuild them from
    # model.name_or_path, so a checkpoint holds what trains plus what resuming needs, nothing more.
    trainable_only = any(not p.requires_grad for p in engine.module.parameters())
    engine.save_checkpoint(str(path), tag=DS_TAG, client_state=state, exclude_frozen_parameters=trainable_only)
    (path / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
    if data_state is not None:
        _save_data_state(path, rank, data_state)
    else:
        (path / f"data_rank{rank}.json").write_text("null")
    if rank == 0:
        record = {**state, **meta, "trainable_only": trainable_only}
        (path / STATE_FILE).write_text(json.dumps(record, indent=2, default=str))
        engine.module.config.save_pretrained(path / HF_DIR)
        processor.save_pretrained(path / HF_DIR)
    dist.barrier()  # where ranks share a directory (one node, one scratch), every file is written now
    write_manifest(path, rank)
    return str(path)


def _sha256(stream: Any) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(8 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, rank: int) -> None:
    """`manifest_rank{rank}.json`: size and sha256 of every file in `directory` (other manifests aside)."""
    files = {}
    for file in sorted(directory.rglob("*")):
        if file.is_file() and not file.name.startswith(MANIFEST_PREFIX):
            with file.open("rb") as f:
                files[file.relative_to(directory).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(f)}
    partial = directory / f".{MANIFEST_PREFIX}{rank}.json.tmp"
    partial.write_text(json.dumps({"rank": rank, "files": files}, indent=1))
    partial.rename(directory / f"{MANIFEST_PREFIX}{rank}.json")


def problems(checkpoint_uri: str, ranks: list[int] | None = None, deep: bool = False) -> list[str]:
    """Why the checkpoint at `checkpoint_uri` (local or s3://) is incomplete or damaged; empty when it
    is whole. Checks sizes; `deep` also checks sha256 (reads every file). `ranks` limits the files
    checked to those ranks' manifests (each rank reads its own files and rank 0's); every rank's
    manifest must exist regardless.
    """
    fs, path = filesystem(checkpoint_uri)
    state_info = fs.get_file_info(f"{path}/{STATE_FILE}")
    if state_info.type != pafs.FileType.File:
        return [f"{STATE_FILE} is missing"]
    with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
        try:
            world_size = int(json.loads(f.read())["world_size"])
        except (ValueError, KeyError) as exc:
            return [f"{STATE_FILE} is unreadable ({exc})"]
    found: list[str] = []
    for rank in range(world_size):
        name = f"{MANIFEST_PREFIX}{rank}.json"
        if fs.get_file_info(f"{path}/{name}").type != pafs.FileType.File:
            found.append(f"{name} is missing (rank {rank} did not finish saving)")
            continue
        if ranks is not None and rank not in ranks:
            continue
        with fs.open_input_stream(f"{path}/{name}") as f:
            listed = json.loads(f.read())["files"]
        infos = fs.get_file_info([f"{path}/{relative}" for relative in listed])
        for (relative, expected), info in zip(listed.items(), infos, strict=True):
            if info.type != pafs.FileType.File:
                found.append(f"{relative} is missing (listed in {name})")
            elif info.size != expected["size"]:
                found.append(f"{relative} has {info.size} bytes, {name} says {expected['size']}")
            elif deep:
                with fs.open_input_stream(f"{path}/{relative}") as f:
                    if _sha256(f) != expected["sha256"]:
                        found.append(f"{relative} does not match its sha256 in {name}")
    return found


def newest_complete(run_uri: str, names: list[str]) -> tuple[str | None, list[str]]:
    """The newest whole checkpoint among `names` (directories in `run_uri`), and a line for each newer
    one passed over with what is wrong with it."""
    skipped = []
    for name in sorted(names, reverse=True):
        uri = f"{run_uri.rstrip('/')}/{name}"
        wrong = problems(uri)
        if not wrong:
            return uri, skipped
        skipped.append(f"{uri}: {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    return None, skipped


def read_meta(directory: str) -> dict[str, Any]:
    state_file = Path(directory) / STATE_FILE
    if not state_file.is_file():
        raise RuntimeError(
            f"checkpoint {directory} has no {STATE_FILE}; it is incomplete. Delete it to resume from an older one."
        )
    return json.loads(state_file.read_text())


def layout(meta: dict[str, Any]) -> tuple[int, int]:
    """(workers, gradient accumulation) of the run that wrote a checkpoint; their product is its slots."""
    return int(meta["world_size"]), int(meta["config"]["train"]["gradient_accumulation_steps"])


def resume_layout(cfg: Config, meta: dict[str, Any], world_size: int) -> Config:
    """`cfg` laid out to resume the checkpoint described by `meta` on `world_size` workers.

    The slots (workers x accumulation) stay the checkpoint's, so the global batch, the steps per epoch,
    the LR schedule and the rows of every step stay the uninterrupted run's; only the gradient
    accumulation changes, announced. A worker count that does not divide the slots is refused (the
    shards of a slot cannot be split exactly), naming the counts that fit.
    """
    workers, accumulation = layout(meta)
    slots = workers * accumulation
    if slots % world_size:
        fits = [n for n in range(1, slots + 1) if slots % n == 0]
        raise RuntimeError(
            f"the checkpoint to resume was written by {workers} worker(s) x gradient accumulation "
            f"{accumulation} = {slots} data slots, and {world_size} worker(s) cannot share {slots} slots "
            f"evenly, so the epoch's remaining rows cannot be split without repeating or skipping some. "
            f"Resume with scaling.num_workers set to one of {fits}."
        )
    new = slots // world_size
    if (world_size, new) == (cfg.scaling.num_workers, cfg.train.gradient_accumulation_steps):
        return cfg
    if new != cfg.train.gradient_accumulation_steps:
        log.warning("resuming a checkpoint of %d worker(s) x accumulation %d on %d worker(s): gradient "
                    "accumulation %d -> %d keeps the global batch (%d rows) and every row's place in the epoch",
                    workers, accumulation, world_size, cfg.train.gradient_accumulation_steps, new,
                    slots * cfg.train.micro_batch_size)  # fmt: skip
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, gradient_accumulation_steps=new),
        scaling=dataclasses.replace(cfg.scaling, num_workers=world_size),
    )


def needs_universal(directory: str, world_size: int) -> bool:
    """Whether resuming `directory` on `world_size` workers must re-cut DeepSpeed's partitioned optimizer
    state (ZeRO >= 1, or a bf16/fp16 optimizer's per-rank fp32 copy): then the engine must be built
    with `checkpoint.load_universal` and `load` converts the checkpoint first."""
    workers, _ = layout(read_meta(directory))
    return workers != world_size and any((Path(directory) / DS_TAG).glob("*optim_states.pt"))


def _universal_copy(directory: str) -> tuple[str, bool]:
    """Collective: DeepSpeed's universal form of `directory` (ds_to_universal), made once per machine
    and directory in a temporary directory; returns (its root, whether this rank made it and so
    removes it). A failed conversion raises on every rank, naming the rank and the cause."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    rank, world_size = dist.get_rank(), dist.get_world_size()
    key = f"{socket.gethostname()}:{os.path.realpath(directory)}"
    keys: list[str | None] = [None] * world_size
    dist.all_gather_object(keys, key)
    maker = keys.index(key)
    made: str | None = None
    if rank == maker:
        made = tempfile.mkdtemp(prefix="fmdist-universal-")
        args = argparse.Namespace(
            input_folder=f"{directory}/{DS_TAG}", output_folder=f"{made}/{DS_TAG}", num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        )  # fmt: skip
        chatter = io.StringIO()  # its prints and progress bars; kept for the error
        try:
            with (
                weights_only_loads(directory),
                contextlib.redirect_stdout(chatter),
                contextlib.redirect_stderr(chatter),
            ):
                ds_to_universal(args)
        except Exception as exc:  # every rank must hear of it, or the others wait in the gather below
            shutil.rmtree(made, ignore_errors=True)
            made = f"error: rank {rank} could not convert {directory} to a universal checkpoint: {exc!r}"
    paths: list[str | None] = [None] * world_size
    dist.all_gather_object(paths, made)
    path = paths[maker]
    if path is None or path.startswith("error: "):
        raise RuntimeError(f"{path.removeprefix('error: ') if path else 'no universal checkpoint'}. Resume it on "
                           "the worker count that wrote it instead.")  # fmt: skip
    return path, rank == maker


def _repair_zero3_universal_load(engine: Any, universal_root: str) -> None:
    """Undo two shortcuts of DeepSpeed 0.19's ZeRO-3 universal load (stage3.py,
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`) that make a resume drift from the run it continues:
    - it gives every param group the first group's hyperparameters, so biases and norms would start
      to decay: each group gets its own back from the checkpoint;
    - it puts one shared `step` tensor into every group's Adam state, and AdamW increments it in place
      once per group, so bias correction ran ahead by a step per extra group: each gets its own copy.
    """
    saved = torch.load(f"{universal_root}/{DS_TAG}/zero/optimizer_state.pt", weights_only=True)
    groups = saved["optimizer_state_dict"]["param_groups"]
    live = engine.optimizer.optimizer.param_groups
    if len(groups) != len(live):
        raise RuntimeError(f"the universal checkpoint has {len(groups)} optimizer param groups, the run {len(live)}")
    for group, kept in zip(live, groups, strict=True):
        group.update({k: v for k, v in kept.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load(engine: Any, directory: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore model, optimizer, scheduler and RNG on this rank; returns (client state, stream position).

    Every rank must find its own files (checked against the manifests): a missing one is an error naming it,
    never a silent fallback (that would replay or skip rows). On another worker count (`resume_layout`
    first), each rank gets the stream positions of the slots it now owns.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    meta = read_meta(directory)
    workers, accumulation = layout(meta)
    accumulation_now = engine.gradient_accumulation_steps()
    if workers * accumulation != world_size * accumulation_now:
        raise RuntimeError(
            f"checkpoint {directory} has {workers * accumulation} data slots ({workers} worker(s) x accumulation "
            f"{accumulation}) but this run has {world_size} x {accumulation_now}; lay the run out with "
            "checkpoint.resume_layout before building the engine."
        )
    elastic = workers != world_size
    # Each rank checks the files it reads (its own and rank 0's; every rank's on another worker count);
    # all learn of any problem, so no rank goes on into DeepSpeed's collective load alone.
    found: list[list[str]] = [[] for _ in range(world_size)]
    dist.all_gather_object(found, problems(directory, ranks=None if elastic else sorted({0, rank}), deep=True))
    wrong = sorted({line for lines in found for line in lines})
    if wrong:
        raise RuntimeError(
            f"checkpoint {directory} is incomplete or damaged: {'; '.join(wrong)}. Delete it to resume "
            "from the previous complete one."
        )
    source, made = directory, False
    if needs_universal(directory, world_size):
        source, made = _universal_copy(directory)
        if rank == 0:
            log.info("resuming %d worker(s)' ZeRO-%d checkpoint on %d: DeepSpeed universal checkpoint (fp32 "
                     "weights, Adam moments and step re-partitioned)", workers, meta["zero_stage"], world_size)  # fmt: skip
    try:
        with weights_only_loads(directory):
            try:
                load_path, client_state = engine.load_checkpoint(
                    source,
                    tag=DS_TAG,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                    # A trainable-only checkpoint lacks the frozen base, which the run has rebuilt.
                    load_module_strict=not meta.get("trainable_only", False),
                )
            except (OSError, RuntimeError, KeyError, EOFError) as exc:
                raise RuntimeError(f"checkpoint {directory} could not be read on rank {rank}: {exc}") from exc
            if source != directory and meta["zero_stage"] == 3:
                _repair_zero3_universal_load(engine, source)
    finally:
        if source != directory:
            dist.barrier()  # every rank on this machine has read the universal copy
            if made:
                shutil.rmtree(source, ignore_errors=True)
    if load_path is None:
        raise RuntimeError(f"checkpoint {directory} could not be read on rank {rank}: no DeepSpeed shard for {DS_TAG}.")
    # Per-slot state moves with its slot: this rank's slots were the old ranks' slots r*A..r*A+A-1.
    mine = range(rank * accumulation_now, (rank + 1) * accumulation_now)
    _set_rng_state(json.loads((Path(directory) / f"rng_rank{mine[0] // accumulation}.json").read_text()))
    client_state = {**client_state, "iters_in_epoch": client_state["iters_in_epoch"] // accumulation * accumulation_now}
    if not elastic:
        return client_state, _load_data_state(Path(directory), rank)
    owners = sorted({s // accumulation for s in mine})
    states = [_load_data_state(Path(directory), r) for r in owners]
    if any(state is None for state in states):
        return client_state, None
    slots = {r * accumulation + j: slot for r, state in zip(owners, states, strict=True)
             for j, slot in enumerate(state["slots"])}  # fmt: skip
    return client_state, {"slots": [slots[s] for s in mine]}


def find(run_or_checkpoint: str) -> str:
    """The checkpoint itself, or the newest `checkpoint_step_*` inside a run directory."""
    fs, path = filesystem(run_or_checkpoint)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{run_or_checkpoint!r} is not a run or checkpoint directory.")
    if fs.get_file_info(f"{path}/{STATE_FILE}").type == pafs.FileType.File:
        return run_or_checkpoint
    children = fs.get_file_info(pafs.FileSelector(path))
    checkpoints = sorted(c.base_name for c in children if c.base_name.startswith(CHECKPOINT_PREFIX))
    if not checkpoints:
        raise FileNotFoundError(
            f"{run_or_checkpoint!r} has no {CHECKPOINT_PREFIX}* directories and no {STATE_FILE}; "
            "pass a run directory (run.storage_path/run.name) or one of its checkpoints."
        )
    newest, skipped = newest_complete(run_or_checkpoint, checkpoints)
    for line in skipped:
        log.warning("passing over an incomplete checkpoint: %s", line)
    if newest is None:
        raise RuntimeError(
            f"{run_or_checkpoint!r} has no complete checkpoint: " + " | ".join(skipped) + ". Train again, or "
            "restore the missing files."
        )
    return newest


def local_copy(uri: str, scratch: str | None = None) -> str:
    """A local directory with the checkpoint's files (downloaded when it lives on S3)."""
    if "://" not in uri:
        return uri
    scratch = scratch or tempfile.mkdtemp(prefix="fmdist-checkpoint-")
    fs, path = filesystem(uri)
    pafs.copy_files(path, scratch, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return scratch


def consolidated_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from every rank's shard (or the plain module states for ZeRO-0); only the
    trainable ones for a trainable-only (peft) checkpoint."""
    meta = read_meta(directory)
    with weights_only_loads(directory):
        if meta["zero_stage"] == 0:
            states = torch.load(Path(directory) / DS_TAG / "mp_rank_00_model_states.pt", weights_only=True)
            return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(
            directory, tag=DS_TAG, exclude_frozen_parameters=meta.get("trainable_only", False)
        )
