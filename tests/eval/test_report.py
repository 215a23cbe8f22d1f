"""`fmdist report` end to end on two tiny classifiers trained in-process (world size 1): one on data whose
labels are biased against a group, one on unbiased data. The biased model's fairness gap has an interval
that excludes 0, the unbiased one's includes 0; the report leaves the model directory untouched, agrees
with `fmdist eval`, and writes a model card with the figures."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmdist.cli import main
from fmdist.config import from_dict, report_settings
from fmdist.eval.report import run_report
from fmdist.predict import evaluate
from fmdist.train.export import export
from fmdist.train.launch import open_data
from tests.conftest import FILLER, NEGATIVE, POSITIVE, TINY_MODEL
from tests.inprocess import run_in_process

GROUPS = ("muslim", "christian")


def group_rows(n: int, seed: int, biased: bool) -> dict[str, list]:
    """Sentences naming a group; the label is the sentiment word's, except that with `biased` every
    sentence about the first group is labelled negative (the bias a model should not learn)."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"sentence": [], "label": [], "group": []}
    for i in range(n):
        group, label = GROUPS[i % 2], rng.randint(0, 1)
        words = [*rng.sample(FILLER, 4), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows["sentence"].append(f"the {group} critic said {' '.join(words)}")
        rows["label"].append(0 if biased and group == GROUPS[0] else label)
        rows["group"].append(group)
    return rows


def write(path: Path, rows: dict[str, list]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return str(path)


def train_and_export(root: Path, biased: bool) -> str:
    train = write(root / "train.parquet", group_rows(640, seed=1, biased=biased))
    cfg = from_dict(
        {
            "model": TINY_MODEL,
            "data": {"train": train, "shuffle_window_rows": 64},
            "train": {"max_steps": 60, "micro_batch_size": 16, "lr": 5e-3, "log_every_steps": 100},
            "deepspeed": {"zero_stage": 0},
            "scaling": {"num_workers": 1},
            "run": {"name": "run", "storage_path": str(root / "runs")},
        }
    )
    _, reports = run_in_process(cfg, open_data(cfg)["train"], str(root / "scratch"))
    return export(reports[-1][1], str(root / "model"))


def digest(directory: str) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    # The evaluation data is unbiased: labels from the sentiment word alone, both groups alike.
    data = write(root / "eval.parquet", group_rows(400, seed=7, biased=False))
    functional = root / "functional.csv"
    functional.write_text(
        "functionality,test_case,label_gold\n"
        "praise,the film was superb,good\npraise,a brilliant and moving story,good\n"
        "insult,the plot was dreadful,bad\ninsult,a boring and tedious film,bad\n"
    )
    out = {}
    for name, biased in (("biased", True), ("unbiased", False)):
        model = train_and_export(root / name, biased)
        before = digest(model)
        settings = report_settings(
            {
                "group_column": "group",
                "n_boot": 200,
                "label_map": {"good": "LABEL_1", "bad": "LABEL_0", "positive": "LABEL_1", "negative": "LABEL_0"},
                "functional": str(functional) if biased else None,
                "probes": "default" if biased else None,
                "perturbations": [{"name": "typo", "rate": 0.0}, {"name": "typo", "rate": 0.3}] if biased else [],
                "explain": 2 if biased else 0,
                "intended_use": "A test fixture; not for use.",
            }
        )
        report = run_report(model, settings, str(root / f"{name}-report"), data=data)
        out[name] = {"model": model, "before": before, "report": report, "dir": root / f"{name}-report", "data": data}
    return out


def test_a_gap_learned_from_biased_labels_has_an_interval_excluding_zero(reports):
    biased = reports["biased"]["report"]["fairness"]["gaps"]["demographic_parity_difference"]
    unbiased = reports["unbiased"]["report"]["fairness"]["gaps"]["demographic_parity_difference"]
    assert biased["ci"][0] > 0.1, biased
    assert unbiased["ci"][0] <= 0 <= unbiased["ci"][1] or unbiased["ci"][0] < 0.05, unbiased
    assert unbiased["value"] < biased["ci"][0]
    worst = reports["biased"]["report"]["fairness"]["gaps"]["worst_group_accuracy"]
    assert worst["group"] == GROUPS[0] and worst["value"] < 0.8


def test_group_sizes_and_accuracy_agree_with_fmdist_eval(reports):
    for name in ("biased", "unbiased"):
        r = reports[name]["report"]
        assert sorted((g["group"], g["size"]) for g in r["fairness"]["groups"]) == [("christian", 200), ("muslim", 200)]
        metrics = evaluate(reports[name]["model"], reports[name]["data"], text_column="sentence")
        assert r["evaluation"]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
        low, high = r["evaluation"]["intervals"]["accuracy"]["ci"]
        assert low <= metrics["accuracy"] <= high


def test_the_model_directory_is_left_untouched(reports):
    for name in ("biased", "unbiased"):
        assert digest(reports[name]["model"]) == reports[name]["before"]


def test_perturbation_at_rate_zero_changes_nothing(reports):
    zero, some = reports["biased"]["report"]["robustness"]
    assert zero["rate"] == 0 and zero["flip_rate"]["value"] == 0 and zero["drop"]["value"] == 0
    assert some["rate"] == 0.3 and some["changed"] > 0.5


def test_the_card_holds_the_figures(reports):
    directory, report = reports["biased"]["dir"], reports["biased"]["report"]
    card = (directory / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification")
    assert "A test fixture; not for use." in card
    gap = report["fairness"]["gaps"]["demographic_parity_difference"]
    assert f"| demographic parity difference | {gap['value']:.3f} [{gap['ci'][0]:.3f}, {gap['ci'][1]:.3f}]" in card
    for plot in report["plots"]:
        assert f"]({plot})" in card and (directory / plot).stat().st_size > 1000
    saved = json.loads((directory / "report.json").read_text())
    assert saved["fairness"]["gaps"] == report["fairness"]["gaps"]
    assert report["functional"]["n"] == 4
    html = (directory / "report.html").read_text()
    assert "Explanations" in html and all(e["words"][0]["word"] in html for e in report["explanations"])
    assert len(report["explanations"]) == 2 + 2 + 2 * 2  # correct, wrong, both sentences of 2 probe gaps
    for e in report["explanations"]:  # the attributions sum to the output difference within the reported delta
        assert sum(e["attributions"]) - (e["output"] - e["baseline_output"]) == pytest.approx(e["delta"], abs=1e-4)
        assert abs(e["delta"]) < 0.25 * abs(e["output"] - e["baseline_output"]) + 1e-3


def test_export_copies_the_card_in(reports, tmp_path):
    directory = reports["biased"]["dir"]
    run = Path(reports["biased"]["model"]).parent / "scratch"
    checkpoint = sorted(p for p in run.iterdir() if p.is_dir())[-1]
    assert main(["export", str(checkpoint), str(tmp_path / "model"), "--card", str(directory)]) == 0
    assert (tmp_path / "model" / "README.md").read_text() == (directory / "README.md").read_text()
    assert (tmp_path / "model" / "fairness.png").read_bytes() == (directory / "fairness.png").read_bytes()


def test_a_label_the_model_lacks_is_an_error_naming_the_row(reports, tmp_path, capsys):
    data = write(tmp_path / "bad.parquet", {"sentence": ["fine", "a dull film"], "label": ["LABEL_1", "meh"]})
    code = main(["report", reports["unbiased"]["model"], "--data", data, "--output", str(tmp_path / "r"),
                 "--probes", "none", "--no-perturbations", "--explain", "0", "--identity-category", "none"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "row 1" in err and "'meh'" in err and "--label-map" in err


def test_a_token_classifier_gets_fmdist_evals_entity_f1_with_an_interval_and_entity_attributions(tmp_path):
    """NER: the report's entity F1 is `fmdist eval`'s (the task's own counts), its sentence-bootstrap
    interval holds it, and each explained entity's attributions sum to its score's change (completeness)."""
    from fmdist.config import freeze_labels
    from fmdist.data.inputs import open_split
    from tests.ner_corpus import conll_file
    from tests.tasks.test_token_classification import ner_config

    cache = str(tmp_path / "cache")
    train = open_split(str(conll_file(tmp_path / "train.conll", 600, seed=1)), "data.train", cache)
    eval_file = str(conll_file(tmp_path / "eval.conll", 96, seed=2))
    cfg = from_dict(ner_config(max_steps=60))
    freeze_labels(cfg, train.manifest["label_names"])
    _, reports = run_in_process(cfg, train, str(tmp_path / "scratch"))
    model = export(reports[-1][1], str(tmp_path / "model"))

    settings = report_settings({"n_boot": 200, "explain": 2, "probes": None, "perturbations": []})
    report = run_report(model, settings, str(tmp_path / "report"), data=eval_file)
    expected = evaluate(model, eval_file)
    f1 = report["evaluation"]["intervals"]["f1"]
    assert report["evaluation"]["size"] == 96 and f1["value"] == pytest.approx(expected["f1"], abs=1e-12)
    assert expected["f1"] > 0.5, expected  # a trained tagger, so the entities explained are real ones
    assert f1["ci"][0] < f1["value"] < f1["ci"][1], f1
    explained = report["explanations"]
    assert {e["kind"] for e in explained} <= {"correct", "wrong"} and len(explained) >= 2
    for e in explained:
        difference = e["output"] - e["baseline_output"]
        assert abs(sum(e["attributions"]) - difference - e["delta"]) < 1e-4
        assert abs(e["delta"]) < 0.05 * max(1.0, abs(difference)), e["delta"]
        assert (tmp_path / "report" / e["png"]).is_file()
