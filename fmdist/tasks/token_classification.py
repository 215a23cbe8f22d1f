"""Token classification (NER, BERT-style): one tag per word, entity-level metrics with seqeval.

Rows hold a list of words (`tokens`) and a list of tags (`tags`: strings such as B-PER, or integer ids
into the label set). Each word's tag goes on its first sub-token and -100 (ignored by the loss) on
the rest. Words cut by truncation are counted and reported, never dropped silently.

Metrics follow seqeval's strict mode: an entity counts only if its type and its exact span match,
under the tagging scheme (IOB2, IOBES or BILOU) detected from the label set.
"""

from __future__ import annotations

from typing import Any

import torch

from fmdist.config import Config
from fmdist.tasks import DataInfo, Rows, Task
from fmdist.tasks.common import build_auto_model, load_tokenizer, missing_columns

IGNORE = -100


def _is_list_of(arrow_type: str, *inner: str) -> bool:
    return arrow_type.startswith(("list<", "large_list<")) and any(f": {t}" in arrow_type for t in inner)


def check(cfg: Config, info: DataInfo) -> list[str]:
    problems = missing_columns(cfg, info)
    if problems:
        return problems
    words, tags = cfg.data.text_column, cfg.data.label_column
    if not _is_list_of(info.columns[words], "string", "large_string"):
        problems.append(
            f"{info.field}: column {words!r} of {info.uri!r} is {info.columns[words]}, not a list of words; "
            "token classification reads one list of words per row (fmdist prepare writes `tokens` from CoNLL)."
        )
    if not _is_list_of(info.columns[tags], "string", "large_string", "int"):
        problems.append(
            f"{info.field}: column {tags!r} of {info.uri!r} is {info.columns[tags]}, not a list of tags; "
            "give one tag (a string such as B-PER, or an integer id into model.label_names) per word."
        )
    return problems


def check_labels(cfg: Config, source: Any, field: str) -> None:
    """Every tag in the data must be in the label set; errors name the file and row.

    A prepared data set records its tag vocabulary in the manifest: when that is inside the label
    set, nothing is read.
    """
    from fmdist.data.sources import first_row_in_file, iter_file_tables

    names = cfg.model.label_names
    manifest_names = (source.manifest or {}).get("label_names")
    if manifest_names is not None and set(manifest_names) <= set(names):
        return
    known = set(names)
    column = cfg.data.label_column
    for index, path in enumerate(source.files):
        row = first_row_in_file(source, index)
        for table in iter_file_tables(source, index):
            for i, tags in enumerate(table.column(column).to_pylist()):
                bad = [t for t in tags or [] if (t not in known if isinstance(t, str) else not 0 <= t < len(names))]
                if tags is None or bad:
                    row_id = f" (row_id {table.column('row_id')[i].as_py()})" if "row_id" in table.column_names else ""
                    raise ValueError(
                        f"{field}: {path!r} row {row + i}{row_id} has tag {bad[0] if bad else None!r} in column "
                        f"{column!r}, which is not in the label set {names}. Add it to model.label_names, or fix "
                        "the data."
                    )
            row += table.num_rows


def build_model(cfg: Config) -> torch.nn.Module:
    from transformers import AutoModelForTokenClassification

    return build_auto_model(AutoModelForTokenClassification, cfg.model)


def collate(rows: Rows, tokenizer: Any, cfg: Config, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Words -> sub-tokens; each word's tag on its first sub-token, -100 on the others and on specials."""
    names = cfg.model.label_names
    label2id = {n: i for i, n in enumerate(names)}
    words = [[str(w) for w in ws] for ws in rows[cfg.data.text_column]]
    enc = tokenizer(
        words,
        is_split_into_words=True,
        truncation=True,
        max_length=cfg.data.max_length,
        padding="longest",
        return_tensors="pt",
    )
    labels = torch.full(enc["input_ids"].shape, IGNORE, dtype=torch.long)
    words_cut = 0
    for i, tags in enumerate(rows[cfg.data.label_column]):
        if len(tags) != len(words[i]):
            raise ValueError(
                f"data: a row has {len(words[i])} words but {len(tags)} tags in column {cfg.data.label_column!r}; "
                "give exactly one tag per word."
            )
        ids = []
        for tag in tags:
            if isinstance(tag, str):
                if tag not in label2id:
                    raise ValueError(f"data: tag {tag!r} is not in the label set {names}; add it to model.label_names.")
                ids.append(label2id[tag])
            else:
                ids.append(int(tag))
        previous = None
        last_word = -1
        for position, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                labels[i, position] = ids[word]
                last_word = word
            previous = word
        words_cut += len(words[i]) - (last_word + 1)
    batch = dict(enc)
    batch["labels"] = labels
    batch["stats/words_cut"] = torch.tensor(float(words_cut))
    batch["stats/words"] = torch.tensor(float(sum(len(w) for w in words)))
    return batch


def entity_types(names: list[str]) -> list[str]:
    """Entity types of a tag set: B-PER, I-PER -> PER (sorted; O carries none)."""
    return sorted({n.split("-", 1)[1] for n in names if "-" in n})


def scheme_of(names: list[str]) -> Any:
    """The seqeval scheme of a label set: IOBES when it has E-/S- tags, BILOU with L-/U-, else IOB2."""
    from seqeval.scheme import BILOU, IOB2, IOBES

    prefixes = {n.split("-", 1)[0] for n in names if "-" in n}
    if prefixes & {"E", "S"}:
        return IOBES
    if prefixes & {"L", "U"}:
        return BILOU
    return IOB2


def counts_size(cfg: Config) -> int:
    """Layout: (true positives, predicted, gold) per entity type, then correct tokens, tokens, loss sum,
    sentences."""
    return 3 * len(entity_types(cfg.model.label_names)) + 4


def count(counts: torch.Tensor, out: Any, batch: dict[str, torch.Tensor], cfg: Config) -> None:
    """Add one batch: seqeval's strict entity extraction on the first sub-token of each word."""
    from seqeval.scheme import Entities

    names = cfg.model.label_names
    types = {t: i for i, t in enumerate(entity_types(names))}
    labels = batch["labels"]
    # Host sync: entity extraction runs in Python on the predicted and gold tag sequences.
    predicted = out.logits.argmax(-1).cpu()
    gold_ids = labels.cpu()
    gold, pred = [], []
    for g_row, p_row in zip(gold_ids, predicted, strict=True):
        keep = g_row != IGNORE
        gold.append([names[i] for i in g_row[keep].tolist()])
        pred.append([names[i] for i in p_row[keep].tolist()])
    scheme = scheme_of(names)
    local = torch.zeros(counts.shape[0], dtype=torch.float64)
    gold_entities = Entities(gold, scheme).entities
    pred_entities = Entities(pred, scheme).entities
    for g_sentence, p_sentence in zip(gold_entities, pred_entities, strict=True):
        g = {e.to_tuple()[1:] for e in g_sentence}
        p = {e.to_tuple()[1:] for e in p_sentence}
        for tag, _, _ in g & p:
            local[3 * types[tag]] += 1
        for tag, _, _ in p:
            local[3 * types[tag] + 1] += 1
        for tag, _, _ in g:
            local[3 * types[tag] + 2] += 1
    n = 3 * len(types)
    keep = gold_ids != IGNORE
    local[n] = float((predicted[keep] == gold_ids[keep]).sum())
    local[n + 1] = float(keep.sum())
    local[n + 2] = float(out.loss.detach()) * float(keep.sum())
    local[n + 3] = float(len(gold))
    counts += local.to(counts.device)


def _prf(tp: float, predicted: float, gold: float) -> dict[str, float]:
    precision = tp / predicted if predicted else 0.0
    recall = tp / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": int(gold)}


def finalize(counts: list[float], cfg: Config) -> dict[str, Any]:
    types = entity_types(cfg.model.label_names)
    per_type = {t: _prf(*counts[3 * i : 3 * i + 3]) for i, t in enumerate(types)}
    n = 3 * len(types)
    micro = _prf(sum(counts[0:n:3]), sum(counts[1:n:3]), sum(counts[2:n:3]))
    correct, tokens, loss_sum, sentences = counts[n : n + 4]
    metrics = {
        "loss": loss_sum / tokens if tokens else float("nan"),
        "precision": micro["precision"],
        "recall": micro["recall"],
        "f1": micro["f1"],
        "token_accuracy": correct / tokens if tokens else float("nan"),
        "num_examples": int(sentences),
        "num_tokens": int(tokens),
        "per_type": per_type,
        "scheme": scheme_of(cfg.model.label_names).__name__,
        "headline": "f1",
    }
    metrics["scalars"] = {k: float(metrics[k]) for k in ("loss", "precision", "recall", "f1", "token_accuracy")} | {
        f"f1_{t}": c["f1"] for t, c in per_type.items()
    }
    return metrics


def format_report(metrics: dict[str, Any]) -> str:
    width = max(12, *(len(t) + 2 for t in metrics["per_type"]))
    lines = [
        f"entities (seqeval strict, {metrics['scheme']})",
        f"{'':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for name, c in metrics["per_type"].items():
        lines.append(f"{name:<{width}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>10}")
    support = sum(c["support"] for c in metrics["per_type"].values())
    lines.append(
        f"{'micro avg':<{width}}{metrics['precision']:>10.4f}{metrics['recall']:>10.4f}{metrics['f1']:>10.4f}{support:>10}"
    )
    lines.append("")
    lines.append(f"{'token accuracy':<{width}}{metrics['token_accuracy']:>30.4f}{metrics['num_tokens']:>10}")
    lines.append(f"{'sentences':<{width}}{metrics['num_examples']:>30}")
    lines.append(f"{'loss':<{width}}{metrics['loss']:>30.4f}")
    return "\n".join(lines)


def predict(model_dir: str, texts: list[str]) -> list[dict[str, Any]]:
    """Entities of each text with character spans and scores, via transformers' own pipeline.

    Aggregation "first": a word takes the tag predicted on its first sub-token, the one trained (the
    others are -100 in training). "simple" also works with the export but groups sub-tokens by their
    own, untrained, predictions, which can split a word.
    """
    from transformers import pipeline

    ner = pipeline("token-classification", model=model_dir, aggregation_strategy="first", device="cpu")
    out = []
    for text in texts:
        entities = [
            {
                "entity": e["entity_group"],
                "word": e["word"],
                "start": e["start"],
                "end": e["end"],
                "score": float(e["score"]),
            }
            for e in ner(text)
        ]
        out.append({"entities": entities})
    return out


TASK = Task(
    name="token-classification",
    input_column="tokens",
    label_column="tags",
    check=check,
    check_labels=check_labels,
    build_model=build_model,
    load_processor=load_tokenizer,
    collate=collate,
    placeholder=lambda cfg: {cfg.data.text_column: [["."]], cfg.data.label_column: [[cfg.model.label_names[0]]]},
    counts_size=counts_size,
    count=count,
    finalize=finalize,
    format_report=format_report,
    export_class="AutoModelForTokenClassification",
    pipeline_tag="token-classification",
    predict=predict,
)
