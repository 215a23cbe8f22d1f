"""The curves a run leaves: TensorBoard event files, MLflow metrics and curves.png (train/watch.py).

World size 1, the loop in this process. One module-scoped run (8 steps, logged every 2, evaluated at
steps 4 and 8) serves every assertion; a second run resumes it to show that curves.png covers both
attempts."""

from __future__ import annotations

import math

import pytest

from fmdist.config import from_dict
from fmdist.data.sources import resolve
from fmdist.train import watch
from tests.conftest import TINY_MODEL
from tests.inprocess import run_in_process


@pytest.fixture(scope="module")
def watched_run(sentiment_data, tmp_path_factory):
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("watch")
    mp = pytest.MonkeyPatch()
    mp.setenv(watch.MLFLOW_URI_ENV, (root / "mlruns").as_uri())
    mp.setenv(watch.MLFLOW_EXPERIMENT_ENV, "watch-test")
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store keeps the test free of a database
    cfg = from_dict(
        {
            "model": dict(TINY_MODEL),
            "data": {"train": sentiment_data["train"], "eval": sentiment_data["eval"]},
            "train": {"max_steps": 8, "micro_batch_size": 8, "lr": 5e-3, "log_every_steps": 2, "eval_every_steps": 4},
            "run": {"name": "watched", "storage_path": str(root / "runs"), "checkpoint_every_steps": 4},
        }
    )
    train, evaluation = resolve(sentiment_data["train"]), resolve(sentiment_data["eval"])
    summary, reports = run_in_process(cfg, train, str(root / "scratch"), evaluation, curves=True)
    yield {"cfg": cfg, "root": root, "summary": summary, "reports": reports, "train": train, "eval": evaluation}
    mp.undo()


def test_tensorboard_events_hold_every_logged_and_evaluated_value(watched_run):
    series = watch.read_events(f"{watched_run['root']}/runs/watched/{watch.TENSORBOARD_DIR}")
    assert [step for step, _ in series["train/loss"]] == [2, 4, 6, 8]
    assert [step for step, _ in series["train/lr"]] == [2, 4, 6, 8]
    assert all(v > 0 for _, v in series["train/samples_per_s"])
    # The last logged loss is the summary's; the evaluations are the reports'.
    assert series["train/loss"][-1][1] == pytest.approx(watched_run["summary"]["train/loss"], rel=1e-6)
    evals = {m["step"]: m["eval/accuracy"] for m, _ in watched_run["reports"] if "eval/accuracy" in m}
    assert dict(series["eval/accuracy"]) == pytest.approx(evals)
    assert sorted(evals) == [4, 8]
    # The linear schedule decays to 0 at the last step.
    assert series["train/lr"][-1][1] == 0.0 and series["train/lr"][0][1] > 0


def test_mlflow_gets_the_same_metrics_and_the_config(watched_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient((watched_run["root"] / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("watch-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags[watch.MLFLOW_RUN_DIR_TAG] == f"{watched_run['root']}/runs/watched"
    assert run.data.params["train.lr"] == "0.005" and run.data.params["train.max_steps"] == "8"
    series = watch.read_events(f"{watched_run['root']}/runs/watched/{watch.TENSORBOARD_DIR}")
    for tag in ("train/loss", "eval/accuracy", "train/lr"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert history == pytest.approx(dict(series[tag])), tag  # TensorBoard keeps float32
    assert run.info.status == "FINISHED"


def test_curves_png_is_drawn_from_the_events_of_every_attempt(watched_run, tmp_path):
    """A second attempt continues from step 4 with another learning rate, to step 8: the figure's
    train/loss line has the first attempt's steps 2 and 4, and the second attempt's values from step 6."""
    from PIL import Image

    png = watched_run["root"] / "runs" / "watched" / watch.CURVES_FILE
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 800

    cfg, root = watched_run["cfg"], watched_run["root"]
    first = dict(watch.read_events(f"{root}/runs/watched/{watch.TENSORBOARD_DIR}")["train/loss"])
    step4 = next(path for m, path in watched_run["reports"] if m["step"] == 4 and path)
    resumed = from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "lr": 5e-2}})
    run_in_process(resumed, watched_run["train"], str(tmp_path), watched_run["eval"], restore=step4, curves=True)
    series = watch.read_events(f"{root}/runs/watched/{watch.TENSORBOARD_DIR}")
    merged = dict(series["train/loss"])
    assert sorted(merged) == [2, 4, 6, 8]
    assert merged[2] == first[2] and merged[4] == first[4]
    assert merged[6] != first[6] and merged[8] != first[8]  # the later attempt's (lr 10x) values win
    figure = watch.plot_curves(series, "watched")
    (loss_line,) = [line for line in figure.axes[0].lines if line.get_label() == "train/loss"]
    assert list(loss_line.get_xdata()) == [2, 4, 6, 8]
    assert list(loss_line.get_ydata()) == pytest.approx([merged[s] for s in (2, 4, 6, 8)])
    assert [ax.get_title() for ax in figure.axes] == ["loss", "evaluation", "learning rate", "samples/s"]


def test_a_torn_last_record_is_dropped_and_nan_is_not_written(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    w = watch.Watch(str(tmp_path), str(tmp_path), writer)
    watch.record(w, 1, {"a": 1.5, "b": math.nan, "c": "text"})
    watch.record(w, 2, {"a": 2.5})
    writer.close()
    (event_file,) = [p for p in tmp_path.iterdir() if "tfevents" in p.name]
    event_file.write_bytes(event_file.read_bytes()[:-7])  # a writer killed mid-record
    assert watch.read_events(str(tmp_path)) == {"a": [(1, 1.5)]}


def test_mfu_is_logged_on_a_gpu_of_known_peak_only():
    """The loop's MFU meter: LLM Foundry's count over the GPUs' summed peak; none on CPU or an unknown GPU."""
    from transformers import BertConfig, BertForSequenceClassification

    from fmdist.train.loop import mfu_meter

    model = BertForSequenceClassification(BertConfig(vocab_size=100, **TINY_MODEL["from_config"]))
    n = sum(p.numel() for p in model.parameters())
    layers, width = model.config.num_hidden_layers, model.config.hidden_size
    meter = mfu_meter(model, 2, "NVIDIA H100 80GB HBM3")
    assert meter(1e6, 63.6) == pytest.approx(1e6 * (6 * n + 12 * layers * width * 64) / (2 * 989e12))
    assert mfu_meter(model, 2, None) is None and mfu_meter(model, 1, "Tesla T4") is None
