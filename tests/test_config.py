"""Config loading, overrides and validation: every problem reported at once, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fmdist import config
from fmdist.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_bad_field_is_reported_together(tmp_path):
    raw = {
        "model": {"num_labels": 1},
        "data": {"train": "x.parquet", "max_length": 0},
        "train": {"micro_batch_size": -4, "lr_schedule": "exponential", "warmup_ratio": 1.5},
        "deepspeed": {"zero_stage": 4, "offload_params": "cpu"},
        "scaling": {"use_gpu": "maybe"},
    }
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, raw))
    text = str(err.value)
    for field in (
        "model.num_labels",
        "data.max_length",
        "train.micro_batch_size",
        "train.lr_schedule",
        "train.warmup_ratio",
        "deepspeed.zero_stage",
        "deepspeed.offload_params",
        "scaling.use_gpu",
    ):
        assert field in text, field
    assert len(err.value.problems) == 8
    assert "exponential" in text and "linear, cosine, constant" in text


def test_unknown_keys_get_did_you_mean(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, {"trian": {}, "train": {"learning_rate": 1e-3}, "data": {"train": "x"}}))
    text = str(err.value)
    assert "trian: unknown section. Did you mean `train`?" in text
    assert "train.learning_rate: unknown field." in text


def test_wrong_types_name_the_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, {"data": {"train": "x"}, "train": {"epochs": "three", "shuffle": "yes"}}))
    assert "train.epochs: expected int, got str 'three'" in str(err.value)
    assert "train.shuffle: expected bool" in str(err.value)


def test_overrides_apply_on_top_and_are_validated(tmp_path):
    path = write(tmp_path, {"data": {"train": "shards"}, "train": {"lr": 1e-4}})
    cfg = config.load(path, ["train.lr=3e-5", "deepspeed.zero_stage=3", "run.name=exp1"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.run.name == "exp1"
    assert cfg.data.train == str(tmp_path / "shards")  # relative to the config file
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        config.load(path, ["deepspeed.zero_stage=7"])
    with pytest.raises(ConfigError, match="section.field=value"):
        config.load(path, ["train.lr"])


def test_run_name_defaults_to_file_stem_and_global_batch_is_derived(tmp_path):
    cfg = config.load(write(tmp_path, {"data": {"train": "s3://bucket/train"}}), ["train.micro_batch_size=4"])
    assert cfg.run.name == "run"
    assert cfg.data.train == "s3://bucket/train"
    cfg.train.gradient_accumulation_steps = 3
    assert cfg.global_batch_size == 4 * 3 * 2


def test_saved_config_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, {"data": {"train": "x"}, "model": {"from_config": {"num_hidden_layers": 1}}}))
    config.save(cfg, tmp_path / "saved.yaml")
    again = config.load(tmp_path / "saved.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_presets_are_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        # A preset whose data cannot be shipped (CoNLL-2003) leaves data.train to the command line.
        needs_data = yaml.safe_load(path.read_text()).get("data", {}).get("train") is None
        config.load(path, ["data.train=given/on/the/command/line"] if needs_data else [])


def test_paths_on_the_command_line_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    path = write(tmp_path / "configs", {"data": {"eval": "e"}})
    monkeypatch.chdir(tmp_path)
    cfg = config.load(path, ["data.train=data/train.txt"])
    assert cfg.data.train == str(tmp_path / "data/train.txt")  # the command line's: the working directory
    assert cfg.data.eval == str(tmp_path / "configs" / "e")  # the file's: next to the file


def test_reference_doc_matches_the_code():
    doc = (REPO / "docs" / "config.md").read_text()
    assert doc.strip() == config.reference_markdown().strip(), "run: fmdist config-reference > docs/config.md"


def test_a_mistyped_field_does_not_hide_later_problems(tmp_path):
    """A type error used to stop validation: `tune.quantile_fraction: x` hid `run.keep_checkpoints: -1`."""
    raw = {
        "data": {"train": "x"},
        "train": {"max_steps": 10},
        "tune": {"scheduler": "pbt", "perturbation_interval_steps": 5, "quantile_fraction": "x",
                 "search_space": {"train.lr": {"choice": [0.1]}}},
        "run": {"keep_checkpoints": -1},
    }  # fmt: skip
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, raw))
    assert "tune.quantile_fraction: expected float, got str 'x'" in str(err.value)
    assert "run.keep_checkpoints: must be greater than 0, got -1" in str(err.value)


def test_the_label_set_comes_from_the_config_or_the_manifest_and_must_agree(tmp_path):
    cfg = config.load(write(tmp_path, {"model": {"task": "token-classification"}, "data": {"train": "x"}}))
    assert (cfg.data.text_column, cfg.data.label_column) == ("tokens", "tags")  # the task's defaults
    config.freeze_labels(cfg, ["O", "B-PER", "I-PER"])
    assert (cfg.model.label_names, cfg.model.num_labels) == (["O", "B-PER", "I-PER"], 3)
    counted = config.load(write(tmp_path, {"model": {"num_labels": 4}, "data": {"train": "x"}}))
    with pytest.raises(ConfigError, match="model.num_labels: is 4 but the training data's manifest names 3"):
        config.freeze_labels(counted, ["a", "b", "c"])
    named = config.load(write(tmp_path, {"model": {"label_names": ["neg", "pos"]}, "data": {"train": "x"}}))
    config.freeze_labels(named, ["0", "1"])  # the config's names win over the manifest's
    assert named.model.label_names == ["neg", "pos"]
    with pytest.raises(ConfigError, match="model.label_names: the label set is unknown"):
        config.freeze_labels(config.load(write(tmp_path, {"data": {"train": "x"}})), None)
    with pytest.raises(ConfigError, match="has 2 names but model.num_labels is 3"):
        config.load(write(tmp_path, {"model": {"label_names": ["a", "b"], "num_labels": 3}, "data": {"train": "x"}}))


def test_language_modelling_peft_and_distill_settings_are_checked_together():
    with pytest.raises(ConfigError) as info:
        from_dict(
            {
                "data": {"train": "x", "packing": True, "mlm_probability": 1.5},
                "peft": {"method": "qlora", "r": 0},
                "distill": {"alpha": 2.0, "init_from_teacher": True},
            }
        )
    text = str(info.value)
    for expected in (
        "data.packing: packs text for language modelling",
        "data.mlm_probability: must be in (0, 1)",
        "peft.method: must be one of none, lora, adalora, ia3",
        "peft.r: must be greater than 0",
        "distill.alpha: must be in [0, 1]",
        "distill.init_from_teacher: needs distill.teacher",
    ):
        assert expected in text, text
    assert from_dict({"data": {"train": "x"}, "model": {"task": "causal-lm"}}).data.packing is True
    assert from_dict({"data": {"train": "x"}, "model": {"task": "masked-lm"}}).data.packing is False
