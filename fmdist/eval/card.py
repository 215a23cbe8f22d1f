"""The model card: an exported model's README.md, in Hugging Face's model-card form (YAML metadata, then prose).

`fmdist export` writes it from the checkpoint's record (config, evaluation) and the run's provenance
(data manifests, compute); `fmdist report` writes it again with the report's sections (evaluation with
intervals, fairness, robustness, functional tests, explanations) and its plots next to it.
"""

from __future__ import annotations

from typing import Any

from fmdist import tasks
from fmdist.eval.fairness import format_interval


def _header(meta: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    cfg = meta["config"]
    task = tasks.get(cfg["model"]["task"])
    lines = ["---", "library_name: transformers", f"pipeline_tag: {task.pipeline_tag}", "tags: [fmdist, deepspeed]"]
    if cfg["model"].get("name_or_path") and not str(cfg["model"]["name_or_path"]).startswith(("/", ".")):
        lines.append(f"base_model: {cfg['model']['name_or_path']}")
    headline = (report or {}).get("evaluation") or meta.get("eval")
    metric = (headline or {}).get("headline") or "accuracy"  # entity F1 for a token classifier
    if headline and task.labelled and metric in headline:
        lines += [
            "model-index:",
            f"- name: {cfg['run']['name']}",
            "  results:",
            f"  - task: {{type: {task.pipeline_tag}}}",
            f"    dataset: {{name: {(report or {}).get('data', cfg['data']['eval'])}, type: custom}}",
            f"    metrics: [{{type: {metric}, value: {headline[metric]:.4f}}}]",
        ]
    return [*lines, "---", ""]


def _provenance(meta: dict[str, Any]) -> list[str]:
    cfg, provenance = meta["config"], meta.get("provenance") or {}
    lines = ["## Training data", ""]
    for split in ("train", "eval"):
        record = provenance.get(split)
        if record is None:
            if cfg["data"].get(split):
                lines.append(f"- {split}: `{cfg['data'][split]}` (no provenance record: exported from an older run)")
            continue
        lines.append(f"- **{split}**: `{record['uri']}`, {record['rows']:,} rows in {len(record['shards'])} shard(s)")
        for source in record.get("sources") or []:
            lines.append(f"  - source `{source}`")
        for shard in record["shards"][:8]:
            lines.append(f"  - `{shard['path']}`: {shard['rows']:,} rows, sha256 `{shard['sha256']}`")
        if len(record["shards"]) > 8:
            lines.append(f"  - ... {len(record['shards']) - 8} more (all in fmdist_training.json)")
        deid = record.get("deidentification") or {"enabled": False}
        if deid.get("enabled"):
            replaced = ", ".join(f"{k} {v:,}" for k, v in deid.get("replaced", {}).items()) or "nothing found"
            lines.append(f"  - de-identified by `fmdist prepare --redact`: replaced {replaced}")
            if deid.get("detectors"):
                lines.append(f"  - detectors: {', '.join(map(str, deid['detectors']))}")
            if deid.get("not_covered"):
                lines.append(f"  - **not covered by redaction**: {'; '.join(deid['not_covered'])}")
        else:
            lines.append("  - not de-identified by fmdist (no `fmdist prepare --redact` record)")
    lines += [
        "",
        f"Input column `{cfg['data']['text_column']}`, label column `{cfg['data']['label_column']}`, "
        f"max length {cfg['data']['max_length']}.",
        "",
    ]
    return lines


def _compute(meta: dict[str, Any]) -> list[str]:
    compute = meta.get("compute") or {}
    hardware = compute.get("hardware") or "not recorded"
    line = f"{meta['step']} optimizer steps on {meta['world_size']} worker(s) ({hardware})"
    if compute.get("train_time_s") is not None:
        worker_s = compute["train_time_s"] * meta["world_size"]
        line += f"; training took {compute['train_time_s']:.0f} s, {worker_s:,.0f} worker-seconds"
    return ["## Compute", "", line + ".", ""]


def _privacy(meta: dict[str, Any]) -> list[str]:
    """The DP-SGD guarantee when the run was private (the checkpoint records train/privacy.py's plan)."""
    record = meta.get("privacy")
    if not record:
        return []
    target = f", target epsilon {record['target_epsilon']:g}" if record.get("target_epsilon") is not None else ""
    return [
        "## Differential privacy",
        "",
        f"Trained with DP-SGD (fmdist, Opacus {record['accountant'].upper()} accounting): "
        f"**(epsilon {record['epsilon']:.2f}, delta {record['delta']:.3g})** after {record['steps_taken']} steps{target}.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| noise multiplier | {record['noise_multiplier']:.4g} |",
        f"| per-sample clipping norm | {record['max_grad_norm']:g} |",
        f"| Poisson sample rate (expected batch / rows) | {record['sample_rate']:.5g} ({record['expected_batch_size']} "
        f"of {record['num_rows']:,}) |",
        "",
        "The guarantee covers the training rows (example-level, add/remove one row); it does not cover the "
        "pre-trained base model's data, the eval split, or any hyperparameter tuning run on the same data "
        "(each trial spends budget too).",
        "",
    ]


def _hyperparameters(cfg: dict[str, Any]) -> list[str]:
    lines = ["## Training configuration", "", "| setting | value |", "|---|---|"]
    for section in ("train", "deepspeed"):
        for key, value in cfg[section].items():
            lines.append(f"| {section}.{key} | {value} |")
    return [*lines, ""]


def _group_note(row: dict[str, Any], min_group_size: int) -> str:
    notes = (["wide"] if row["wide"] else []) + (
        [] if row["in_gaps"] else [f"under {min_group_size} rows: not in the gaps"]
    )
    return "; ".join(notes)


def _report_sections(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    evaluation = report.get("evaluation")
    if evaluation:
        lines += [
            "## Evaluation",
            "",
            f"On `{report['data']}` ({evaluation['size']:,} rows), 95% bootstrap intervals "
            f"({report['settings']['n_boot']} resamples):",
            "",
            "| metric | value [95% interval] |",
            "|---|---|",
        ]
        lines += [f"| {name} | {format_interval(entry)} |" for name, entry in evaluation["intervals"].items()]
        lines.append("")
    fairness = report.get("fairness")
    if fairness:
        lines += [
            "## Fairness",
            "",
            f"Groups from {fairness['group_source']}; the gaps compare the rate of predicting "
            f"`{fairness['positive_label']}`. Groups marked *wide* have an accuracy interval wider than "
            f"{fairness['wide_interval']}: read their point estimates with care.",
            "",
            "| group | size | accuracy | macro-F1 | selection rate | note |",
            "|---|---:|---|---|---|---|",
        ]
        for row in fairness["groups"]:
            m = row["metrics"]
            lines.append(
                f"| {row['group']} | {row['size']:,} | {format_interval(m['accuracy'])} | {format_interval(m['macro_f1'])} | "
                f"{format_interval(m['selection_rate'])} | {_group_note(row, fairness['min_group_size'])} |"
            )
        if fairness["gaps"]:
            lines += ["", "| gap | value [95% interval] |", "|---|---|"]
        for name, entry in fairness["gaps"].items():
            extra = f" (group {entry['group']})" if "group" in entry else ""
            lines.append(f"| {name.replace('_', ' ')} | {format_interval(entry)}{extra} |")
        if fairness["gaps_note"]:
            lines += ["", fairness["gaps_note"][0].upper() + fairness["gaps_note"][1:]]
        lines += ["", "![per-group metrics](fairness.png)", ""]
    probes = report.get("counterfactual")
    if probes:
        lines += [
            "## Counterfactual identity probes",
            "",
            f"{probes['summary']['texts']:,} sentences: each template filled with every identity term of a category, "
            f"so only the identity changes. Score = probability of `{probes['score_label']}`.",
            "",
            "| category | terms | largest gap [95% interval] | between | flip rate |",
            "|---|---:|---|---|---:|",
        ]
        for name, c in probes["categories"].items():
            gap = c["gap"]
            lines.append(
                f"| {name} | {len(c['terms'])} | {format_interval(gap)} | {gap['max_term']} vs {gap['min_term']} | "
                f"{c['flip_rate']:.3f} |"
            )
        lines += ["", "![mean score per identity term](counterfactual.png)", ""]
    robustness = report.get("robustness")
    if robustness:
        lines += [
            "## Robustness",
            "",
            "| perturbation | rate | accuracy drop [95% interval] | flip rate [95% interval] |",
            "|---|---:|---|---|",
        ]
        for r in robustness:
            drop = r.get("drop")
            lines.append(
                f"| {r['name']} | {r['rate']} | {format_interval(drop) if drop else 'n/a'} | {format_interval(r['flip_rate'])} |"
            )
        lines += ["", "![robustness](robustness.png)", ""]
    functional = report.get("functional")
    if functional:
        lines += [
            "## Functional tests",
            "",
            f"`{functional['path']}`: {functional['passed']:,} of {functional['n']:,} cases pass "
            f"({functional['pass_rate']:.3f}). Worst functionalities:",
            "",
            "| functionality | cases | pass rate [95% interval] |",
            "|---|---:|---|",
        ]
        for f in functional["functionalities"][:10]:
            lines.append(f"| {f['functionality']} | {f['n']} | {format_interval(f['pass_rate'])} |")
        lines += ["", "![worst functionalities](functional.png)", ""]
    explanations = report.get("explanations")
    if explanations:
        lines += ["## Example explanations", "", "Integrated Gradients (Captum) over the input embeddings; "
                  "red pushes towards the predicted label, blue away. All of them: report.html.", ""]  # fmt: skip
        for e in explanations[:4]:
            lines.append(f"- *{e['kind']}*, predicted `{e['label']}` (p {e['probability']:.2f}): ![]({e['png']})")
        lines.append("")
    return lines


def render(
    meta: dict[str, Any], report: dict[str, Any] | None = None, adapter: bool = False, intended_use: str | None = None
) -> str:
    """The card's Markdown.

    Args:
        meta: The export's training record (fmdist_training.json: config, step, world size, eval,
            provenance, compute).
        report: `fmdist report`'s results; without it, the card shows the run's own evaluation.
        adapter: The export is a peft adapter, not merged weights.
        intended_use: The intended-use paragraph, in the user's words.

    Returns:
        The README.md text.
    """
    cfg = meta["config"]
    task = tasks.get(cfg["model"]["task"])
    labels = (
        f" ({cfg['model']['num_labels']} labels: {', '.join(cfg['model']['label_names'])})" if task.labelled else ""
    )
    lines = [
        *_header(meta, report),
        f"# {cfg['run']['name']}",
        "",
        f"Trained with fmdist from `{cfg['model']['name_or_path']}` for {task.name}{labels}, DeepSpeed "
        f"ZeRO-{meta['zero_stage']}, {cfg['deepspeed']['precision']}. Load it with "
        f'`transformers.{task.export_class}` or `pipeline("{task.pipeline_tag}", model=...)`.',
        "",
        "## Intended use",
        "",
        intended_use
        or "Not stated: set `report.intended_use` (or `--intended-use`) to say what this model is for, "
        "for whom, and what it must not be used for.",
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
    lines += [*_provenance(meta), *_compute(meta), *_privacy(meta), *_hyperparameters(cfg)]
    if report:
        lines += _report_sections(report)
    else:
        lines += ["## Evaluation", ""]
        if meta.get("eval"):
            lines += ["On the run's eval split:", "", "```", task.format_report(meta["eval"]), "```", ""]
        else:
            lines += ["No evaluation split was configured.", ""]
    lines += [
        "## Limitations",
        "",
        "- Every figure holds for the data it was measured on; other data (domains, dialects, time) may differ.",
    ]
    if not report:
        lines.append("- Per-group fairness and robustness were not measured: run `fmdist report` before shipping.")
    else:
        wide = [r["group"] for r in (report.get("fairness") or {}).get("groups", []) if r["wide"]]
        if wide:
            lines.append(f"- Groups with too few rows for a tight interval: {', '.join(wide)}.")
        lines.append(
            "- Identity probes and functional tests cover the listed terms and templates only; absence of a gap "
            "there is not evidence of absence elsewhere."
        )
    return "\n".join([*lines, ""])
