"""Checkpoint -> a standard Hugging Face model directory (safetensors, config, processor, model card).

ZeRO shards (stage 3 included) are consolidated into fp32 weights with DeepSpeed's own
`zero_to_fp32`, so the exported model is exactly the trained one, loadable by plain `transformers`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from fmdist import tasks
from fmdist.data.fs import filesystem
from fmdist.data.sources import PROVENANCE_FILE
from fmdist.eval import card
from fmdist.train.checkpoint import HF_DIR, consolidated_state_dict, find, local_copy, read_meta

TRAINING_FILE = "fmdist_training.json"
"""Written next to the export: the checkpoint's metadata (config, label set, eval metrics)."""


def run_records(checkpoint_uri: str) -> dict[str, Any]:
    """What the run directory adds to a checkpoint's record: the data provenance and the compute.

    Both are written by `fmdist train` next to the checkpoints (provenance.json at the start, metrics.json
    at the end); a checkpoint copied out of its run, or a run still going, lacks one or both.
    """
    fs, path = filesystem(checkpoint_uri.rsplit("/", 1)[0])
    out: dict[str, Any] = {}
    for name in (PROVENANCE_FILE, "metrics.json"):
        try:
            with fs.open_input_stream(f"{path}/{name}") as f:
                out[name] = json.loads(f.read())
        except (FileNotFoundError, OSError):
            continue
    provenance = out.get(PROVENANCE_FILE) or {}
    metrics = out.get("metrics.json") or {}
    return {
        "provenance": {k: v for k, v in provenance.items() if k in ("train", "eval")},
        "compute": {"hardware": provenance.get("hardware"), "train_time_s": metrics.get("train/time_s")},
    }


def export(run_or_checkpoint: str, out_dir: str, adapter: bool = False) -> str:
    """Write a Hugging Face model directory for the newest checkpoint of a run; returns `out_dir`.

    A peft run is merged into its base weights (plain transformers loads it, no adapter keys), or with
    `adapter` written as a peft adapter directory. Merging happens here, offline in one process, from
    the consolidated adapter weights: merging under ZeRO-3 fails (peft#297).
    """
    import transformers

    checkpoint_uri = find(run_or_checkpoint)
    with tempfile.TemporaryDirectory(prefix="fmdist-export-") as scratch:
        local = local_copy(checkpoint_uri, scratch)
        meta = read_meta(local)
        task = tasks.get(meta["config"]["model"]["task"])
        state = consolidated_state_dict(local)
        if meta.get("trainable_only"):
            model = _from_adapter(meta, state, out_dir if adapter else None)
        elif adapter:
            raise ValueError(
                f"--adapter: {checkpoint_uri} was not trained with peft (peft.method none); export it whole."
            )
        else:
            hf_config = transformers.AutoConfig.from_pretrained(Path(local) / HF_DIR)
            model = getattr(transformers, task.export_class).from_config(hf_config)
            missing, unexpected = model.load_state_dict(state, strict=False)
            # Buffers that the model rebuilds itself (e.g. position ids) may be absent; weights may not.
            missing = [k for k in missing if k in dict(model.named_parameters())]
            if missing or unexpected:
                raise RuntimeError(
                    f"checkpoint {checkpoint_uri} does not match its model config: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}."
                )
        if model is not None:
            # transformers 5 writes only on rank 0 once torch.distributed is up, but an export is this
            # process's own file write: every worker that distils exports its teacher into its own scratch.
            model.should_save_on_this_rank = lambda is_main_process: is_main_process
            model.save_pretrained(out_dir, safe_serialization=True)
        task.load_processor(str(Path(local) / HF_DIR)).save_pretrained(out_dir)
        meta = {**meta, **run_records(checkpoint_uri), "checkpoint": checkpoint_uri}
        Path(out_dir, "README.md").write_text(card.render(meta, adapter=adapter))
        Path(out_dir, TRAINING_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def _from_adapter(meta: dict[str, Any], trainable: dict[str, Any], adapter_dir: str | None) -> Any:
    """The merged model of a peft checkpoint (or None after writing the adapter to `adapter_dir`).

    The frozen base is rebuilt exactly as training built it: the same config, seeded the same way.
    """
    import torch

    from fmdist.config import from_dict
    from fmdist.train import adapters

    cfg = from_dict(meta["config"])
    torch.manual_seed(cfg.train.seed)
    base = tasks.get(cfg.model.task).build_model(cfg)
    if cfg.peft.method == "none":
        # Frozen weights without peft (DP-SGD's frozen embeddings, train/privacy.py): the rebuilt base holds
        # them; what trained is loaded over it, every key used.
        if adapter_dir is not None:
            raise ValueError(
                "--adapter: this checkpoint was not trained with peft (peft.method none); export it whole."
            )
        _, unexpected = base.load_state_dict(trainable, strict=False)
        if unexpected:
            raise RuntimeError(f"checkpoint weights {unexpected[:5]} do not match the rebuilt {type(base).__name__}.")
        return base
    if adapter_dir is not None:
        adapters.save_adapter(base, cfg, trainable, adapter_dir)
        return None
    return adapters.merged_model(base, cfg, trainable)
