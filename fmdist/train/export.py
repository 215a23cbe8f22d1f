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
from fmdist.train.checkpoint import HF_DIR, consolidated_state_dict, find, local_copy, read_meta

TRAINING_FILE = "fmdist_training.json"
"""Written next to the export: the checkpoint's metadata (config, label set, eval metrics)."""


def model_card(meta: dict[str, Any], metrics: dict[str, Any] | None, adapter: bool = False) -> str:
    cfg = meta["config"]
    task = tasks.get(cfg["model"]["task"])
    labels = (
        f" ({cfg['model']['num_labels']} labels: {', '.join(cfg['model']['label_names'])})" if task.labelled else ""
    )
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {task.pipeline_tag}",
        "tags: [fmdist, deepspeed]",
        "---",
        "",
        f"# {cfg['run']['name']}",
        "",
        f"Trained with fmdist from `{cfg['model']['name_or_path']}` for {task.name}{labels}, {meta['step']} "
        f"optimizer steps on {meta['world_size']} worker(s), DeepSpeed ZeRO-{meta['zero_stage']}, "
        f"{cfg['deepspeed']['precision']}. Load it with `transformers.{task.export_class}` or "
        f'`pipeline("{task.pipeline_tag}", model=...)`.',
        "",
    ]
    peft, teacher = cfg.get("peft", {}), cfg.get("distill", {})
    if peft.get("method", "none") != "none":
        lines += [
            f"Adapted with {peft['method']} (r {peft['r']}, alpha {peft['alpha']}, modules "
            f"{peft['target_modules'] or 'peft default'}); {'the adapter alone' if adapter else 'merged into the base weights'}.",
            "",
        ]
    if teacher.get("teacher"):
        lines += [
            f"Distilled from `{teacher['teacher']}` (alpha {teacher['alpha']}, temperature {teacher['temperature']}"
            f"{', initialised from the teacher' if teacher.get('init_from_teacher') else ''}).",
            "",
        ]
    lines += [
        "## Training data",
        "",
        f"- train: `{cfg['data']['train']}`",
        f"- eval: `{cfg['data']['eval']}`",
        f"- input column `{cfg['data']['text_column']}`, label column `{cfg['data']['label_column']}`, "
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
        lines += ["```", task.format_report(metrics), "```"]
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
            model.save_pretrained(out_dir, safe_serialization=True)
        task.load_processor(str(Path(local) / HF_DIR)).save_pretrained(out_dir)
        Path(out_dir, "README.md").write_text(model_card(meta, meta.get("eval"), adapter))
        Path(out_dir, TRAINING_FILE).write_text(json.dumps({**meta, "checkpoint": checkpoint_uri}, indent=2))
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
    if adapter_dir is not None:
        adapters.save_adapter(base, cfg, trainable, adapter_dir)
        return None
    return adapters.merged_model(base, cfg, trainable)
