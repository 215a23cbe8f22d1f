"""The `fmdist` command: prepare, train, tune, federate, export, predict, generate, eval, config-reference."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from fmdist.config import Config, ConfigError


def _print_summary(summary: dict[str, Any], cfg: Config) -> None:
    from fmdist import tasks

    timings = summary.get("timings", {})
    print("\n=== fmdist run summary ===")
    print(f"run directory      {summary['run_dir']}")
    print(f"final checkpoint   {summary.get('checkpoint')}")
    print(f"optimizer steps    {summary.get('step')}")
    print(f"final train loss   {summary.get('train/loss', float('nan')):.4f}")
    print(
        f"training time      {summary.get('train/time_s', 0):.1f} s, {summary.get('train/samples_per_s', 0):.1f} samples/s"
    )
    if timings:
        parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in timings.items() if k != "time_to_first_step_s")
        print(f"time to first step {timings.get('time_to_first_step_s', float('nan')):.1f} s ({parts})")
    if summary.get("train/words_cut"):
        print(
            f"truncated words    {summary['train/words_cut']:.0f} of {summary['train/words']:.0f} (raise data.max_length)"
        )
    print(f"curves             {summary['run_dir']}/curves.png  (live: tensorboard --logdir {cfg.run.storage_path})")
    if summary.get("eval"):
        print("\n" + tasks.get(cfg.model.task).format_report(summary["eval"]))
    print(f"\nnext: fmdist export {summary['run_dir']} ./exported-model")


def cmd_train(args: argparse.Namespace) -> int:
    from fmdist import config
    from fmdist.runtime import use_cpu_accelerator_if_no_gpu
    from fmdist.train.launch import train

    cfg = config.load(args.config, args.overrides)
    use_cpu_accelerator_if_no_gpu()
    import psutil  # a Ray dependency

    # Time to first step counts from this process's start: the imports and Ray's start are waited for too.
    summary = train(cfg, quiet=not args.verbose, started_at=psutil.Process().create_time())
    _print_summary(summary, cfg)
    if cfg.report.enabled:
        from fmdist.eval.report import after_training

        report = after_training(cfg, summary["run_dir"])
        _print_report_summary(report, cfg.report.output or f"{summary['run_dir']}/report")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from fmdist import config
    from fmdist.runtime import use_cpu_accelerator_if_no_gpu
    from fmdist.tune.search import SearchInterrupted, tune_run

    cfg = config.load(args.config, args.overrides)
    use_cpu_accelerator_if_no_gpu()
    try:
        summary = tune_run(cfg, resume=args.resume)
    except SearchInterrupted as exc:
        print(f"fmdist tune: {exc}", file=sys.stderr)
        return 130
    best = summary["best"]
    print(f"\nbest trial {best['trial']}: {cfg.tune.metric} = {best['best_metric']:.4f} with {best['config']}")
    print(f"leaderboard  {summary['run_dir']}/leaderboard.csv (and .json), plot {summary['run_dir']}/trials.png")
    print(f"best config  {summary['best_yaml']}  (fmdist train {summary['best_yaml']})")
    print(f"best model   {summary['best_model']}")
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from fmdist import config, tasks
    from fmdist.federate import RESULTS_FILE, federate
    from fmdist.runtime import use_cpu_accelerator_if_no_gpu

    cfg = config.load(args.config, args.overrides)
    use_cpu_accelerator_if_no_gpu()
    results = federate(cfg)
    print(f"\n=== fmdist federated run ({cfg.federate.strategy}, {cfg.federate.rounds} rounds) ===")
    print(f"run directory      {results['run_dir']} (per-round metrics in {RESULTS_FILE})")
    print(f"final checkpoint   {results['checkpoint']}")
    print("\n" + tasks.get(cfg.model.task).format_report(results["final_eval"]))
    print(f"\nnext: fmdist export {results['run_dir']} ./exported-model")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fmdist.runtime import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    from fmdist.predict import task_of
    from fmdist.train.export import export

    out = export(args.run, args.out_dir, adapter=args.adapter)
    if args.card:
        from fmdist.eval.report import copy_card

        print(f"copied the report's model card into {out}: {', '.join(copy_card(args.card, out))}")
    if args.adapter:
        print(f"exported a peft adapter to {out} (load it with peft.PeftModel.from_pretrained(base_model, {out!r}))")
        return 0
    task = task_of(out)
    print(
        f"exported a Hugging Face model to {out} (load it with transformers.{task.export_class}.from_pretrained, "
        f'or pipeline("{task.pipeline_tag}", model="{out}"))'
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fmdist.predict import predict, task_of

    task = task_of(args.model_dir)
    if task.name == "image-classification":
        inputs = list(args.image or [])
        if not inputs:
            print("fmdist predict: this is an image model; give --image FILE (repeatable).", file=sys.stderr)
            return 2
    else:
        inputs = list(args.text or [])
        if args.file:
            inputs += [line.rstrip("\n") for line in Path(args.file).read_text().splitlines() if line.strip()]
        if not inputs:
            print(
                "fmdist predict: give --text TEXT (repeatable) or --file FILE with one text per line.", file=sys.stderr
            )
            return 2
    for item, pred in zip(inputs, predict(args.model_dir, inputs), strict=True):
        if args.json:
            print(json.dumps({"input": item, **pred}))
        elif "continuation" in pred:
            print(f"{item}{pred['continuation']}")
        elif "fills" in pred:
            fills = " | ".join(
                ", ".join(f"{f['token']} {f['probability']:.2f}" for f in slot) for slot in pred["fills"]
            )
            print(f"{item}\n    {fills}")
        elif "entities" in pred:
            found = "  ".join(
                f"[{e['entity']} {item[e['start'] : e['end']]!r} {e['start']}:{e['end']} {e['score']:.2f}]"
                for e in pred["entities"]
            )
            print(f"{item}\n    {found or '(no entities)'}")
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in list(pred["probabilities"].items())[:5])
            print(f"{pred['label']:<12} {probs}  | {item}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fmdist.tasks.language_modeling import generate

    text = generate(args.model_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(args.prompt + text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fmdist.predict import evaluate, task_of

    metrics = evaluate(args.model_dir, args.data, args.text_column, args.label_column, args.max_length)
    print(task_of(args.model_dir).format_report(metrics))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
        print(f"\nwrote {args.output}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from fmdist.data.prepare import prepare

    *inputs, output = args.paths
    if not inputs:
        print("fmdist prepare: give at least one INPUT and then the OUTPUT directory.", file=sys.stderr)
        return 2
    manifests = prepare(
        inputs,
        output,
        redact=args.redact,
        redact_entities=args.redact_entities or ("PERSON" if args.redact else "none"),
        output_format=args.format,
        rows_per_shard=args.rows_per_shard,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        input_format=args.input_format,
        train_tokenizer=args.train_tokenizer,
        vocab_size=args.vocab_size,
        text_column=args.text_column,
    )
    for split, manifest in manifests.items():
        print(
            f"{output.rstrip('/')}/{split}: {manifest['total_rows']} rows in {len(manifest['shards'])} {args.format} shard(s)"
        )
    names = manifests["train"].get("label_names")
    if names:
        print(f"label set ({len(names)}, recorded in the manifests): {', '.join(names)}")
    if args.train_tokenizer:
        print(f"{output.rstrip('/')}/tokenizer: a byte-level BPE of {args.vocab_size} tokens (set model.tokenizer)")
    deid = manifests["train"]["deidentification"]
    if deid["enabled"]:
        print("replaced: " + ", ".join(f"{k} {v}" for k, v in deid["replaced"].items()))
        ner = f" (spaCy model {deid['ner']['spacy_model']} {deid['ner']['spacy_model_version']})" if deid["ner"] else ""
        print("detectors: " + ", ".join(deid["detectors"]) + ner)
        if deid["not_covered"]:
            print("not covered: " + "; ".join(deid["not_covered"]))
    return 0


REPORT_FLAGS = (
    "text_column",
    "label_column",
    "group_column",
    "identity_category",
    "positive_label",
    "probes",
    "functional",
    "n_boot",
    "min_group_size",
    "seed",
    "explain",
    "max_rows",
    "intended_use",
)
"""`fmdist report` flags that set the `report:` key of the same name over --config."""


def cmd_report(args: argparse.Namespace) -> int:
    import yaml

    from fmdist.config import report_settings
    from fmdist.eval.report import run_report

    raw: dict = {}
    if args.config:
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        raw = raw.get("report", raw) if isinstance(raw, dict) else raw
    raw = dict(raw)
    for key in REPORT_FLAGS:
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    if args.label_map is not None:
        try:
            raw["label_map"] = json.loads(args.label_map)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f'--label-map {args.label_map!r} is not JSON ({exc}); e.g. \'{{"hateful": "negative"}}\'.'
            ) from None
    for key in ("probes", "identity_category", "functional"):
        if raw.get(key) in ("none", "null"):
            raw[key] = None
    if args.no_perturbations:
        raw["perturbations"] = []
    settings = report_settings(raw, args.config)
    report = run_report(args.model_dir, settings, args.output, data=args.data)
    _print_report_summary(report, args.output)
    return 0


def _print_report_summary(report: dict, output: str) -> None:
    from fmdist.eval.fairness import format_interval as ci

    print(f"\n=== fmdist report: {report['model']} on {report['data']} ===")
    if "evaluation" in report:
        for name, entry in report["evaluation"]["intervals"].items():
            print(f"{name:<32}{ci(entry)}")
    if "fairness" in report:
        for name, entry in report["fairness"]["gaps"].items():
            print(f"{name:<32}{ci(entry)}")
        if report["fairness"]["gaps_note"]:
            print(f"per-group gaps: {report['fairness']['gaps_note']}")
    for name, c in (report.get("counterfactual") or {}).get("categories", {}).items():
        print(
            f"identity gap, {name:<18}{ci(c['gap'])} ({c['gap']['max_term']} vs {c['gap']['min_term']}; "
            f"permutation p {c['gap']['p_value']:.3f}, flip rate {c['flip_rate']:.3f})"
        )
    for r in report.get("robustness") or []:
        print(f"{r['name'] + ' @ ' + str(r['rate']):<32}drop {ci(r['drop']) if r.get('drop') else 'n/a'}, "
              f"flips {r['flip_rate']['value']:.3f}")  # fmt: skip
    if "functional" in report:
        print(f"functional tests                {report['functional']['pass_rate']:.3f} pass")
    print(
        f"\nwrote {output}/report.json, report.html"
        + (", README.md (model card)" if Path(output, "README.md").exists() else "")
    )


def cmd_config_reference(args: argparse.Namespace) -> int:
    from fmdist.config import reference_markdown

    print(reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmdist", description="Fine-tune foundation models on Ray with DeepSpeed.")
    parser.add_argument("--debug", action="store_true", help=f"print tracebacks of errors (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune per a YAML config (resumes a run with the same name)")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.lr=1e-4")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show every worker's output (Hugging Face, DeepSpeed, Ray), not only fmdist's",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="search hyperparameters: every trial is a multi-worker DeepSpeed run")
    p.add_argument("config", help="YAML config file with a tune section")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search (same run.name)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("federate", help="federated fine-tuning: Flower strategies over simulated clients on Ray")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. federate.rounds=5")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("export", help="consolidate a run's newest checkpoint into a Hugging Face model directory")
    p.add_argument("run", help="run directory (run.storage_path/run.name) or one checkpoint directory")
    p.add_argument("out_dir")
    p.add_argument(
        "--adapter", action="store_true", help="peft runs: write the adapter (loads with peft) instead of merging it"
    )
    p.add_argument("--card", metavar="REPORT_DIR", help="copy the model card and plots written by fmdist report")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="fairness, robustness, explanations and a model card for an exported classifier")
    p.add_argument("model_dir", help="a directory written by fmdist export (it is only read)")
    p.add_argument("--data", help="labelled data (file, glob or directory of shards, local or s3://)")
    p.add_argument("--output", required=True, help="the report directory (report.json, report.html, README.md, PNGs)")
    p.add_argument("--config", help="a YAML of report settings (the keys of a config's report: section)")
    p.add_argument("--text-column", help="input column (default: the model's training config)")
    p.add_argument("--label-column", help="label column (default: the model's training config)")
    p.add_argument("--group-column", help="a column naming each row's group (default: identity terms in the text)")
    p.add_argument("--identity-category", help="identity-term groups from this probe category, all, or none")
    p.add_argument("--label-map", help='data/probe labels -> model labels as JSON, e.g. \'{"hateful": "negative"}\'')
    p.add_argument("--positive-label", help="the label whose rate the gaps compare (default: second of two)")
    p.add_argument("--probes", help="counterfactual probe set: default, a YAML of your own, or none")
    p.add_argument("--functional", help="functional tests, a CSV in HateCheck's format")
    p.add_argument("--no-perturbations", action="store_true", help="skip the robustness section")
    p.add_argument("--n-boot", type=int, help="bootstrap resamples (default 1000)")
    p.add_argument("--min-group-size", type=int, help="smaller groups are listed but left out of the gaps (default 30)")
    p.add_argument("--seed", type=int, help="seeds resampling, perturbations and examples (default 0)")
    p.add_argument("--explain", type=int, help="cases explained per kind (default 3; 0 skips)")
    p.add_argument("--max-rows", type=int, help="report on the first N rows only")
    p.add_argument("--intended-use", help="the model card's intended-use paragraph")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="continue a prompt with an exported causal language model")
    p.add_argument("model_dir")
    p.add_argument("--prompt", default="", help="the text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens only")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("predict", help="print labels, entities or classes from an exported model")
    p.add_argument("model_dir")
    p.add_argument("--text", action="append", help="a text to classify or tag (repeatable)")
    p.add_argument("--file", help="a file with one text per line")
    p.add_argument("--image", action="append", help="an image file to classify (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="evaluate an exported model on a labelled data set")
    p.add_argument("model_dir")
    p.add_argument("--data", required=True, help="file, glob or directory of shards (local or s3://)")
    p.add_argument("--output", help="write the metrics as JSON here")
    p.add_argument("--text-column", help="input column (default: the task's, e.g. sentence, tokens, image)")
    p.add_argument("--label-column", help="label column (default: the task's, e.g. label, tags)")
    p.add_argument("--max-length", type=int, default=128)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prepare", help="write (de-identified) Parquet/Arrow shards with a manifest")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="INPUT [INPUT ...] OUTPUT",
        help="input files (CSV, TSV, JSONL, CoNLL, text) or image folders (one sub-folder per class), then the output directory",
    )
    p.add_argument(
        "--redact",
        action="store_true",
        help="replace e-mails, phones, URLs, IPs, card numbers and person names (names need fmdist[pii])",
    )
    p.add_argument(
        "--redact-entities",
        metavar="TYPES",
        help="with --redact: the named entities to replace, comma-separated of PERSON, LOCATION, ORGANIZATION, "
        "or none (default: PERSON)",
    )
    p.add_argument("--format", choices=["parquet", "arrow"], default="parquet")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.0,
        help="put this fraction of rows in OUTPUT/eval (a seeded sample; for plain text, the contiguous tail)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the train/eval split")
    p.add_argument("--input-format", choices=["csv", "tsv", "jsonl", "conll", "text"], help="default: from the suffix")
    p.add_argument(
        "--train-tokenizer", choices=["bpe"], help="also train a byte-level BPE on the train split -> OUTPUT/tokenizer"
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens in the trained tokenizer (--train-tokenizer)")
    p.add_argument("--text-column", default="text", help="the column the tokenizer learns from (default: text)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("config-reference", help="print the config reference (Markdown)")
    p.set_defaults(func=cmd_config_reference)
    return parser


DEBUG_ENV = "FMDIST_DEBUG"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fmdist {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # A one-line message for the user's mistakes; an internal bug must not hide behind it.
        if debug:
            traceback.print_exc()
        hint = "" if debug else f"\n(run with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(f"fmdist {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
