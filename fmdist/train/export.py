"""Checkpoint -> a standard Hugging Face model directory (safetensors, config, tokenizer, model card).

ZeRO shards (stage 3 included) are consolidated into fp32 weights with DeepSpeed's own
`zero_to_fp32`, so the exported model is exactly the trained one, loadable by plain `transformers`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from fmdist.data.fs import filesystem
from fmdist.train.loop import DS_TAG, HF_DIR, STATE_FILE

CHECKPOINT_PREFIX = "checkpoint_step_"


def find_checkpoint(run_or_checkpoint: str) -> str:
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
    return f"{run_or_checkpoint.rstrip('/')}/{checkpoints[-1]}"


def _local_copy(uri: str, scratch: str) -> str:
    """A local directory with the checkpoint's files (downloaded when it lives on S3)."""
    if "://" not in uri:
        return uri
    fs, path = filesystem(uri)
    pafs.copy_files(path, scratch, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return scratch


def consolidated_state_dict(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from every rank's shard (or the plain module states for ZeRO-0)."""
    meta = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
    if meta["zero_stage"] == 0:
        states = torch.load(Path(checkpoint_dir) / DS_TAG / "mp_rank_00_model_states.pt", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)


def model_card(meta: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    cfg = meta["config"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        "tags: [fmdist, deepspeed]",
        "---",
        "",
        f"# {cfg['run']['name']}",
        "",
        f"Fine-tuned with fmdist from `{cfg['model']['name_or_path']}` for {cfg['model']['task']} "
        f"({cfg['model']['num_labels']} labels), {meta['step']} optimizer steps on {meta['world_size']} worker(s), "
        f"DeepSpeed ZeRO-{meta['zero_stage']}, {cfg['deepspeed']['precision']}.",
        "",
        "## Training data",
        "",
        f"- train: `{cfg['data']['train']}`",
        f"- eval: `{cfg['data']['eval']}`",
        f"- text column `{cfg['data']['text_column']}`, label column `{cfg['data']['label_column']}`, "
        f"max length {cfg['data']['max_length']}",
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key, value in cfg["train"].items():
        lines.append(f"| train.{key} | {value} |")
    lines += ["", "## Evaluation", ""]
    if metrics:
        from fmdist.eval.metrics import format_report

        lines += ["```", format_report(metrics), "```"]
    else:
        lines.append("No evaluation split was configured.")
    lines += [
        "",
        "## Limitations",
        "",
        "Metrics above are on the configured eval split only; check per-group fairness and robustness before shipping.",
        "",
    ]
    return "\n".join(lines)


def export(run_or_checkpoint: str, out_dir: str) -> str:
    """Write a Hugging Face model directory for the newest checkpoint of a run; returns `out_dir`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    checkpoint_uri = find_checkpoint(run_or_checkpoint)
    with tempfile.TemporaryDirectory(prefix="fmdist-export-") as scratch:
        local = _local_copy(checkpoint_uri, scratch)
        meta = json.loads((Path(local) / STATE_FILE).read_text())
        hf_config = AutoConfig.from_pretrained(Path(local) / HF_DIR)
        model = AutoModelForSequenceClassification.from_config(hf_config)
        state = consolidated_state_dict(local)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Buffers that the model rebuilds itself (e.g. position ids) may be absent; weights may not.
        missing = [k for k in missing if k in dict(model.named_parameters())]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {checkpoint_uri} does not match its model config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}."
            )
        model.save_pretrained(out_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(Path(local) / HF_DIR).save_pretrained(out_dir)
        metrics = meta.get("eval")
        Path(out_dir, "README.md").write_text(model_card(meta, metrics))
        Path(out_dir, "fmdist_training.json").write_text(json.dumps({**meta, "checkpoint": checkpoint_uri}, indent=2))
    return out_dir
