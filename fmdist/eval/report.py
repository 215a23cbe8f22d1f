"""`fmdist report`: what a reviewer needs before a classifier ships, written next to (never into) the model.

One exported model and one labelled data set in; out, into `output`:
- report.json: every figure (evaluation with intervals, per-group metrics and gaps, counterfactual
  identity probes, perturbation robustness, functional tests, explanations);
- report.html: the same for people, with the explanations' coloured words;
- README.md: the model card, with the plots (PNG) beside it (`fmdist export --card` copies it in).

Each section is its own module (fairness, probes, robustness, functional, explain); this one reads the
data, runs the model once over it, and hands each section what it needs. Sequence classification gets
every section; token classification entity P/R/F1 with sentence-bootstrap intervals and an attribution
per entity; image classification the per-group metrics and saliency maps; the language-model tasks are
refused with the reason (their figure is perplexity, from `fmdist eval`).
"""

from __future__ import annotations

import html as html_lib
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fmdist.config import ReportConfig
from fmdist.eval.fairness import format_interval, percentile_interval
from fmdist.runtime import get_logger

log = get_logger("fmdist.report")
TEXT_TASKS = ("sequence-classification",)
REPORT_TASKS = (*TEXT_TASKS, "token-classification", "image-classification")
EXPLANATION_DIR = "explanations"


def _model(model_dir: str) -> tuple[Any, Any, Any]:
    """(task, model in eval mode, processor) of an exported model."""
    import transformers

    from fmdist.predict import task_of

    task = task_of(model_dir)
    if task.name not in REPORT_TASKS:
        raise ValueError(
            f"fmdist report covers {', '.join(REPORT_TASKS)}; {model_dir} is a {task.name} model. Its metrics "
            f"come from `fmdist eval {model_dir} --data ...`."
        )
    model = getattr(transformers, task.export_class).from_pretrained(model_dir).eval()
    return task, model, task.load_processor(model_dir)


def text_scorer(model: Any, tokenizer: Any, max_length: int = 128, batch_size: int = 64) -> Callable:
    """texts -> [n, num_labels] softmax probabilities (the interface every text section takes)."""
    import torch

    def probabilities(texts: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt")  # fmt: skip
                out.append(model(**enc).logits.float().softmax(-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.num_labels))

    return probabilities


def read_rows(data: str, columns: dict[str, str | None], max_rows: int | None) -> dict[str, list[Any]]:
    """The named columns of `data` (any form data.eval takes), in order; a missing column is an error
    that names it, the data and the columns there are."""
    from fmdist.data.inputs import open_split
    from fmdist.data.sources import iter_tables
    from fmdist.predict import EVAL_CACHE

    source = open_split(data, "--data", EVAL_CACHE)
    present = list(source.manifest["schema"])
    for flag, column in columns.items():
        if column is not None and column not in present:
            raise ValueError(f"{flag} {column!r}: {data} has no such column (it has {present}); pass {flag}.")
    wanted = {flag: column for flag, column in columns.items() if column is not None}
    rows: dict[str, list[Any]] = {flag: [] for flag in wanted}
    for table in iter_tables(source):
        for flag, column in wanted.items():
            rows[flag].extend(table.column(column).to_pylist())
        if max_rows is not None and len(next(iter(rows.values()))) >= max_rows:
            break
    return {flag: values[:max_rows] for flag, values in rows.items()}


def group_names(values: list[Any]) -> list[str]:
    """A group column's values as names; an empty cell is the group `(missing)`, shown like any other."""
    return ["(missing)" if v is None or str(v).strip() == "" else str(v) for v in values]


def label_ids(values: list[Any], label_names: list[str], label_map: dict[str, str], where: str) -> np.ndarray:
    """Gold labels as the model's ids: ids as they are, names through `label_map` (then the model's own)."""
    ids = []
    for row, value in enumerate(values):
        if isinstance(value, int | np.integer) and not isinstance(value, bool):
            if not 0 <= value < len(label_names):
                raise ValueError(
                    f"{where} row {row}: label id {value} is outside the model's {len(label_names)} labels."
                )
            ids.append(int(value))
            continue
        name = label_map.get(str(value), str(value))
        if name not in label_names:
            raise ValueError(
                f"{where} row {row}: label {value!r} is not one of the model's labels {label_names}; map it with "
                f'--label-map \'{{"{value}": "{label_names[0]}"}}\' (report.label_map).'
            )
        ids.append(label_names.index(name))
    return np.asarray(ids, dtype=np.int64)


def bootstrap_interval(correct: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """The 95% percentile interval of a mean over seeded resamples of the rows."""
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), (n_boot, len(correct)))].mean(axis=1)
    return percentile_interval(means)


def evaluation(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str], n_boot: int, seed: int) -> dict:
    """Accuracy and macro-F1 with 95% bootstrap intervals (macro-F1 via fairlearn's frame, one group)."""
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import f1_score

    frame = MetricFrame(
        metrics={"macro_f1": lambda t, p: f1_score(t, p, labels=list(range(len(label_names))), average="macro")},
        y_true=y_true, y_pred=y_pred, sensitive_features=np.zeros(len(y_true)), n_boot=n_boot,
        ci_quantiles=[0.025, 0.975], random_state=seed,
    )  # fmt: skip
    correct = (y_true == y_pred).astype(float)
    return {
        "size": len(y_true),
        "accuracy": float(correct.mean()),
        "intervals": {
            "accuracy": {"value": float(correct.mean()), "ci": bootstrap_interval(correct, n_boot, seed)},
            "macro_f1": {
                "value": float(frame.overall["macro_f1"]),
                "ci": [float(frame.overall_ci[0]["macro_f1"]), float(frame.overall_ci[1]["macro_f1"])],
            },
        },
    }


def _explain_cases(
    texts: list[str], y_true: np.ndarray, y_pred: np.ndarray, probes: dict | None, count: int, seed: int
) -> list[tuple[str, str]]:
    """(kind, text) to explain: sampled correct and wrong predictions, and the sentences of the largest
    counterfactual gaps."""
    rng = random.Random(seed)
    correct = [i for i in range(len(texts)) if y_true[i] == y_pred[i]]
    wrong = [i for i in range(len(texts)) if y_true[i] != y_pred[i]]
    cases = [("correct", texts[i]) for i in rng.sample(correct, min(count, len(correct)))]
    cases += [("wrong", texts[i]) for i in rng.sample(wrong, min(count, len(wrong)))]
    if probes:
        pairs = sorted(
            (pair for c in probes["categories"].values() for pair in c.get("largest_differences", [])),
            key=lambda pair: -abs(pair["difference"]),
        )
        for pair in pairs[:count]:
            cases += [("counterfactual gap", pair["text_a"]), ("counterfactual gap", pair["text_b"])]
    return cases


def run_report(model_dir: str, settings: ReportConfig, output: str, data: str | None = None) -> dict[str, Any]:
    """Write the report for an exported model into `output`; returns what report.json holds.

    Args:
        model_dir: A directory written by `fmdist export` (or any Hugging Face classifier directory).
        settings: The `report:` section (the CLI's flags land there too).
        output: The report directory (created; the model directory is only read).
        data: The labelled data; default `settings.data`.

    Returns:
        The report as plain values.
    """
    data = data or settings.data
    if data is None:
        raise ValueError("fmdist report needs labelled data: pass --data PATH (or set report.data).")
    task, model, processor = _model(model_dir)
    label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    training = _training_record(model_dir)
    data_cfg = (training.get("config") or {}).get("data", {})
    text_column = settings.text_column or data_cfg.get("text_column") or task.input_column
    label_column = settings.label_column or data_cfg.get("label_column") or task.label_column
    columns = {"--text-column": text_column, "--label-column": label_column, "--group-column": settings.group_column}
    rows = read_rows(data, columns, settings.max_rows)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "data": data,
        "task": task.name,
        "label_names": label_names,
        "settings": {k: v for k, v in vars(settings).items() if k not in ("enabled", "output")},
    }
    plots: list[str] = []
    if task.name == "token-classification":
        max_length = int(data_cfg.get("max_length") or 128)
        _token_sections(report, settings, model, processor, rows, label_names, max_length, out)
    elif task.name in TEXT_TASKS:
        y_true = label_ids(rows["--label-column"], label_names, settings.label_map, data)
        probabilities = text_scorer(model, processor, max_length=int(data_cfg.get("max_length") or 128))
        texts = [str(t) for t in rows["--text-column"]]
        log.info("report: scoring %d rows of %s", len(texts), data)
        y_pred = probabilities(texts).argmax(-1)
        _text_sections(report, settings, probabilities, texts, y_true, y_pred, rows, label_names, out, plots)
        _explanations(report, settings, model, processor, texts, y_true, y_pred, out)
    else:
        y_true = label_ids(rows["--label-column"], label_names, settings.label_map, data)
        _image_sections(report, settings, model, processor, rows, y_true, label_names, out, plots)
    report["plots"] = plots
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.html").write_text(render_html(report))
    from fmdist.eval import card

    if training:
        (out / "README.md").write_text(card.render(training, report, intended_use=settings.intended_use))
    log.info("report: wrote %s (report.json, report.html%s, %d plots)", out, ", README.md" if training else "",
             len(plots))  # fmt: skip
    return report


def _training_record(model_dir: str) -> dict[str, Any]:
    from fmdist.train.export import TRAINING_FILE

    path = Path(model_dir, TRAINING_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def _text_sections(
    report: dict[str, Any],
    settings: ReportConfig,
    probabilities: Callable,
    texts: list[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    rows: dict[str, list[Any]],
    label_names: list[str],
    out: Path,
    plots: list[str],
) -> None:
    from fmdist.eval import fairness, functional, probes, robustness

    report["evaluation"] = evaluation(y_true, y_pred, label_names, settings.n_boot, settings.seed)
    probe_set = None
    if settings.probes is not None:
        probe_set = probes.load_probe_set(None if settings.probes == "default" else settings.probes)
    groups, source = None, None
    if settings.group_column is not None:
        groups, source = group_names(rows["--group-column"]), f"column `{settings.group_column}`"
    elif settings.identity_category is not None:
        category = None if settings.identity_category == "all" else settings.identity_category
        groups = probes.identity_groups(texts, probe_set, category)
        source = f"identity terms of the probe set ({settings.identity_category}) found in the text"
    if groups is not None:
        log.info("report: per-group metrics, %d groups, %d bootstrap resamples", len(set(groups)), settings.n_boot)
        result = fairness.group_metrics(y_true, y_pred, groups, label_names, settings.positive_label,
                                        settings.n_boot, settings.seed,
                                        min_group_size=settings.min_group_size)  # fmt: skip
        report["fairness"] = {"group_source": source, **result}
        fairness.plot_groups(result, str(out / "fairness.png"))
        plots.append("fairness.png")
    score_label = settings.positive_label or report.get("fairness", {}).get("positive_label") or label_names[-1]
    if probe_set is not None:
        log.info("report: counterfactual identity probes")
        result = probes.counterfactual(probabilities, probe_set, label_names, score_label,
                                       label_map=settings.label_map, n_boot=settings.n_boot, seed=settings.seed)  # fmt: skip
        report["counterfactual"] = {"score_label": score_label, **result}
        probes.plot_counterfactual(result, str(out / "counterfactual.png"))
        plots.append("counterfactual.png")
    if settings.perturbations:
        log.info("report: robustness under %d perturbations", len(settings.perturbations))
        pairs = [(p["name"], float(p["rate"])) for p in settings.perturbations]
        results = robustness.robustness(probabilities, texts, y_true, label_names, pairs, seed=settings.seed,
                                        n_boot=settings.n_boot)  # fmt: skip
        report["robustness"] = results
        robustness.plot_robustness(results, str(out / "robustness.png"))
        plots.append("robustness.png")
    if settings.functional is not None:
        log.info("report: functional tests from %s", settings.functional)
        result = functional.functional_tests(probabilities, settings.functional, label_names,
                                             label_map=settings.label_map, n_boot=settings.n_boot,
                                             seed=settings.seed)  # fmt: skip
        report["functional"] = {"path": settings.functional, **result}
        functional.plot_functional(result, str(out / "functional.png"))
        plots.append("functional.png")


def _explanations(
    report: dict[str, Any],
    settings: ReportConfig,
    model: Any,
    tokenizer: Any,
    texts: list[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    out: Path,
) -> None:
    from fmdist.eval import explain

    if settings.explain <= 0:
        return
    cases = _explain_cases(texts, y_true, y_pred, report.get("counterfactual"), settings.explain, settings.seed)
    log.info("report: explaining %d cases (Integrated Gradients)", len(cases))
    explained = explain.explain_texts(model, tokenizer, [text for _, text in cases])
    for (kind, _), e in zip(cases, explained, strict=True):
        e["kind"] = kind
    _write_explanations(report, explained, out, "Integrated Gradients")


def _write_explanations(report: dict[str, Any], explained: list[dict[str, Any]], out: Path, title: str) -> None:
    """A PNG heat map per explained text (explanations/NN.png) and the report's explanation entries."""
    from fmdist.eval import explain

    (out / EXPLANATION_DIR).mkdir(exist_ok=True)
    for i, e in enumerate(explained):
        e["png"] = f"{EXPLANATION_DIR}/{i:02d}.png"
        explain.heatmap_png(e, str(out / e["png"]))
    report["explanations"] = explained
    report["explanations_html"] = explain.html(explained, title)


def _token_sections(
    report: dict[str, Any],
    settings: ReportConfig,
    model: Any,
    tokenizer: Any,
    rows: dict[str, list[Any]],
    label_names: list[str],
    max_length: int,
    out: Path,
) -> None:
    """Token classification: the task's own entity metrics (seqeval, strict), with 95% intervals from
    resampling sentences, and Integrated Gradients for sampled correct and wrong predicted entities.

    Each sentence's counts come from the task's `count`, so the totals are what training's evaluation
    and `fmdist eval` report; a resample sums the sampled sentences' counts and runs `finalize`.
    """
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F
    from seqeval.metrics.sequence_labeling import get_entities

    from fmdist.config import Config, ModelConfig
    from fmdist.eval import explain
    from fmdist.tasks import token_classification as tc

    cfg = Config(model=ModelConfig(name_or_path=report["model"], task=tc.TASK.name, label_names=label_names))
    cfg.data.text_column, cfg.data.label_column, cfg.data.max_length = "words", "tags", max_length
    words = [[str(w) for w in ws] for ws in rows["--text-column"]]
    tags = [[label_names[t] if isinstance(t, int) else str(t) for t in ts] for ts in rows["--label-column"]]
    size = tc.counts_size(cfg)
    counts = np.zeros((len(words), size))
    predicted: list[list[str]] = []
    log.info("report: tagging %d sentences", len(words))
    with torch.no_grad():
        for start in range(0, len(words), 32):
            chunk = {"words": words[start : start + 32], "tags": tags[start : start + 32]}
            batch = tc.collate(chunk, tokenizer, cfg)
            logits = model(**{k: v for k, v in batch.items() if not k.startswith("stats/")}).logits
            for j in range(len(chunk["words"])):
                labels = batch["labels"][j : j + 1]
                one = torch.zeros(size, dtype=torch.float64)
                loss = F.cross_entropy(logits[j], labels[0], ignore_index=tc.IGNORE)
                tc.count(one, SimpleNamespace(logits=logits[j : j + 1], loss=loss), {"labels": labels}, cfg)
                counts[start + j] = one.numpy()
                first = labels[0] != tc.IGNORE
                predicted.append([label_names[i] for i in logits[j].argmax(-1)[first].tolist()])
    metrics = tc.finalize(counts.sum(0).tolist(), cfg)
    rng = np.random.default_rng(settings.seed)
    samples = {name: [] for name in ("f1", "precision", "recall", "token_accuracy")}
    for _ in range(settings.n_boot):
        resampled = tc.finalize(counts[rng.integers(0, len(words), len(words))].sum(0).tolist(), cfg)
        for name in samples:
            samples[name].append(resampled[name])
    metrics["intervals"] = {
        name: {"value": float(metrics[name]), "ci": percentile_interval(v)} for name, v in samples.items()
    }
    metrics["size"] = len(words)
    report["evaluation"] = metrics
    if settings.explain <= 0:
        return
    # One predicted entity per sampled sentence: sentences whose predicted entities all match the gold
    # ones (correct) and sentences with a predicted entity that is not gold (wrong).
    correct, wrong = [], []
    for i, (gold_tags, pred_tags) in enumerate(zip(tags, predicted, strict=True)):
        cut = words[i][: len(pred_tags)]  # words past max_length have no prediction
        gold = set(get_entities(gold_tags[: len(cut)]))
        spurious = [e for e in get_entities(pred_tags) if e not in gold]
        if spurious:
            wrong.append((i, spurious[0]))
        elif gold and set(get_entities(pred_tags)) == gold:
            correct.append((i, sorted(gold, key=lambda e: e[1])[0]))
    pick = random.Random(settings.seed)
    cases = [("correct", c) for c in pick.sample(correct, min(settings.explain, len(correct)))]
    cases += [("wrong", c) for c in pick.sample(wrong, min(settings.explain, len(wrong)))]
    log.info("report: explaining %d entities (Integrated Gradients)", len(cases))
    explained = []
    for kind, (i, (entity_type, first, last)) in cases:
        entity = {"start_word": first, "end_word": last, "label": entity_type}
        (e,) = explain.explain_entities(model, tokenizer, words[i][: len(predicted[i])], [entity],
                                        max_length=max_length)  # fmt: skip
        e.update(kind=kind, gold=" ".join(tags[i][first : last + 1]))
        explained.append(e)
    _write_explanations(report, explained, out, "Integrated Gradients per entity")


def _image_sections(
    report: dict[str, Any],
    settings: ReportConfig,
    model: Any,
    processor: Any,
    rows: dict[str, list[Any]],
    y_true: np.ndarray,
    label_names: list[str],
    out: Path,
    plots: list[str],
) -> None:
    """Image classification: evaluation with intervals, per-group metrics (a group column), saliency maps."""
    import torch

    from fmdist.eval import explain, fairness
    from fmdist.tasks.image_classification import decode

    images = [decode(cell, f"{report['data']} row {i}") for i, cell in enumerate(rows["--text-column"])]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        y_pred = torch.cat([model(pixel_values=pixels[i : i + 64]).logits for i in range(0, len(pixels), 64)])
    y_pred = y_pred.argmax(-1).numpy()
    report["evaluation"] = evaluation(y_true, y_pred, label_names, settings.n_boot, settings.seed)
    if settings.group_column is not None:
        groups = group_names(rows["--group-column"])
        result = fairness.group_metrics(y_true, y_pred, groups, label_names, settings.positive_label,
                                        settings.n_boot, settings.seed,
                                        min_group_size=settings.min_group_size)  # fmt: skip
        report["fairness"] = {"group_source": f"column `{settings.group_column}`", **result}
        fairness.plot_groups(result, str(out / "fairness.png"))
        plots.append("fairness.png")
    if settings.explain > 0:
        rng = random.Random(settings.seed)
        picked = rng.sample(range(len(images)), min(2 * settings.explain, len(images)))
        explained = explain.explain_images(model, pixels[picked])
        (out / EXPLANATION_DIR).mkdir(exist_ok=True)
        for i, (index, e) in enumerate(zip(picked, explained, strict=True)):
            png = f"{EXPLANATION_DIR}/{i:02d}.png"
            explain.overlay_png(np.asarray(images[index], dtype=np.float32) / 255.0, e["attribution"], str(out / png))
            e.update(kind="correct" if y_pred[index] == y_true[index] else "wrong", png=png,
                     label=label_names[e["target"]], probability=e.get("probability", float("nan")))  # fmt: skip
            e.pop("attribution")
        report["explanations"] = explained


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html_lib.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html_lib.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict[str, Any]) -> str:
    """report.html: the report's tables, plots and explanations on one self-contained page (plots linked)."""
    parts = [f"<h1>fmdist report: {html_lib.escape(report['model'])}</h1>",
             f"<p>data {html_lib.escape(report['data'])}, task {report['task']}, labels "
             f"{html_lib.escape(', '.join(report['label_names']))}</p>"]  # fmt: skip
    if "evaluation" in report:
        e = report["evaluation"]
        parts += [f"<h2>Evaluation ({e['size']} rows)</h2>",
                  _table(["metric", "value [95% interval]"], [[k, format_interval(v)] for k, v in e["intervals"].items()])]  # fmt: skip
    if "fairness" in report:
        f = report["fairness"]
        parts += [f"<h2>Per-group metrics</h2><p>groups from {html_lib.escape(f['group_source'])}</p>",
                  _table(["group", "size", "accuracy", "macro-F1", "selection rate", "wide interval", "in gaps"],
                         [[r["group"], r["size"], format_interval(r["metrics"]["accuracy"]), format_interval(r["metrics"]["macro_f1"]),
                           format_interval(r["metrics"]["selection_rate"]), "yes" if r["wide"] else "",
                           "" if r["in_gaps"] else "no"] for r in f["groups"]]),
                  _table(["gap", "value [95% interval]"], [[k, format_interval(v)] for k, v in f["gaps"].items()]),
                  f"<p>{html_lib.escape(f['gaps_note'])}</p>" if f["gaps_note"] else "",
                  '<img src="fairness.png">']  # fmt: skip
    if "counterfactual" in report:
        c = report["counterfactual"]
        parts += ["<h2>Counterfactual identity probes</h2>",
                  _table(["category", "largest gap [95% interval]", "between", "flip rate"],
                         [[name, format_interval(v["gap"]), f"{v['gap']['max_term']} / {v['gap']['min_term']}",
                           f"{v['flip_rate']:.3f}"] for name, v in c["categories"].items()]),
                  '<img src="counterfactual.png">']  # fmt: skip
    if "robustness" in report:
        rows = []
        for r in report["robustness"]:
            rows.append(
                [
                    r["name"],
                    r["rate"],
                    format_interval(r["drop"]) if r.get("drop") else "n/a",
                    format_interval(r["flip_rate"]),
                ]
            )
        parts += ["<h2>Robustness</h2>", _table(["perturbation", "rate", "accuracy drop", "flip rate"], rows),
                  '<img src="robustness.png">']  # fmt: skip
        for r in report["robustness"]:
            if r.get("examples"):
                parts.append(f"<h3>flips under {html_lib.escape(r['name'])}</h3>")
                parts.append(_table(["original", "perturbed", "before", "after"],
                                    [[x["original"], x["perturbed"], x["before"], x["after"]] for x in r["examples"]]))  # fmt: skip
    if "functional" in report:
        f = report["functional"]
        parts += [f"<h2>Functional tests</h2><p>{f['passed']} of {f['n']} pass</p>",
                  _table(["functionality", "cases", "pass rate [95% interval]"],
                         [[x["functionality"], x["n"], format_interval(x["pass_rate"])] for x in f["functionalities"]]),
                  '<img src="functional.png">']  # fmt: skip
    if report.get("explanations_html"):
        parts += ["<h2>Explanations</h2>", report["explanations_html"]]
    elif report.get("explanations"):
        parts += ["<h2>Explanations</h2>"] + [f'<img src="{e["png"]}">' for e in report["explanations"]]
    style = "body{font-family:sans-serif;max-width:70em;margin:auto}td,th{border:1px solid #ccc;padding:2px 6px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(parts)}</body></html>"


def copy_card(report_dir: str, model_dir: str) -> list[str]:
    """Copy a report's model card and plots into an exported model directory; returns the files copied."""
    copied = []
    for path in Path(report_dir).iterdir():
        if path.name == "README.md" or path.suffix == ".png":
            shutil.copy2(path, Path(model_dir, path.name))
            copied.append(path.name)
    if (Path(report_dir) / EXPLANATION_DIR).is_dir():
        shutil.copytree(Path(report_dir) / EXPLANATION_DIR, Path(model_dir, EXPLANATION_DIR), dirs_exist_ok=True)
        copied.append(EXPLANATION_DIR + "/")
    if "README.md" not in copied:
        raise ValueError(f"{report_dir} holds no README.md: point --card at a directory written by fmdist report.")
    return copied


def after_training(cfg: Any, run_dir: str) -> dict[str, Any]:
    """The `report:` section of a training config, run once training ends: export the final model to
    <run>/model, then report on `report.data` (default data.eval) into `report.output` (default <run>/report).

    Raises:
        ValueError: The run directory is not local (the export and report are written beside it), or there
            is no data to report on.
    """
    from fmdist.data.fs import filesystem
    from fmdist.train.export import export

    fs, _ = filesystem(run_dir)
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem) and cfg.report.output is None:
        raise ValueError(
            f"report.enabled: the run {run_dir} is not on local disk; set report.output to a local directory "
            f"(the model is exported there too), or run `fmdist export` and `fmdist report` afterwards."
        )
    output = cfg.report.output or f"{run_dir}/report"
    model_dir = f"{output}/model" if cfg.report.output else f"{run_dir}/model"
    data = cfg.report.data or cfg.data.eval
    if data is None:
        raise ValueError("report.enabled: set report.data (or data.eval) to the labelled data to report on.")
    export(run_dir, model_dir)
    log.info("report: exported %s to %s; reporting on %s", run_dir, model_dir, data)
    report = run_report(model_dir, cfg.report, output, data=data)
    copy_card(output, model_dir)
    return report
