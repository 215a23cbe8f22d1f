"""Language modelling: causal (next-token pre-training or fine-tuning) and masked (continued pre-training).

Both read text: packed into blocks of `data.max_length` tokens once, into the cache (data/packing.py),
or with `data.packing: false` one padded row per text. Both report loss and perplexity weighted by
token over every eval token of every rank; causal LM also reports nats and bits per character, so that
models with different tokenizers compare (nanoGPT's character-level figures are nats per character).

Masked LM masks 15% of tokens (`data.mlm_probability`), of which 80% become the mask token, 10% a
random token and 10% stay: the recipe of transformers' DataCollatorForLanguageModeling. Each row is
masked by its own generator, seeded from the loop's seed for this rank and iter and from the row's
tokens, so a resumed run masks exactly as the uninterrupted run would, and evaluation (seed None)
masks every row the same way whatever the batch or world size.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from fmdist.config import Config
from fmdist.data.packing import packed_split, separator_id
from fmdist.models.resolve import resolve_model_path
from fmdist.tasks import DataInfo, Metrics, Rows, Task
from fmdist.tasks.common import has_weights, is_string

COUNTS = ("nll", "tokens", "chars", "examples")
PACKED_COLUMN = "input_ids"


def load_tokenizer(path: str) -> Any:
    """The fast tokenizer at `path`, with a pad token (the EOS token when it has none, as for GPT-2)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.sep_token
    return tokenizer


def tokenizer_path(cfg: Config) -> str:
    return cfg.model.tokenizer or cfg.model.name_or_path


def check(cfg: Config, info: DataInfo) -> list[str]:
    if PACKED_COLUMN in info.columns and "chars" in info.columns:
        return []  # packed blocks (data/packing.py)
    text = cfg.data.text_column
    if text not in info.columns:
        return [
            f"{info.field}: {info.uri!r} has no column {text!r}; it has {list(info.columns)}. Set data.text_column "
            f"(model.task {cfg.model.task} reads one text per row)."
        ]
    if not is_string(info.columns[text]):
        return [
            f"{info.field}: column {text!r} of {info.uri!r} is {info.columns[text]}, not text; set data.text_column."
        ]
    return []


def prepare_split(cfg: Config, source: Any, field: str, cache_dir: str) -> Any:
    """With `data.packing`, the split as packed token blocks (made once into the cache); else as it is."""
    if not cfg.data.packing:
        return source
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    return packed_split(source, tokenizer, cfg.data.text_column, cfg.data.max_length, cache_dir, field)


def _build(auto_class: Any, cfg: Config) -> torch.nn.Module:
    """A pretrained model, or a fresh one from its config (with `from_config` overrides or when the directory
    has no weights); the vocabulary is sized to `model.tokenizer` when one is given."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(tokenizer_path(cfg)) if cfg.model.tokenizer else None
    if cfg.model.from_config is not None or not has_weights(path):
        hf_config = AutoConfig.from_pretrained(path, **(cfg.model.from_config or {}))
        if tokenizer is not None:
            hf_config.vocab_size = len(tokenizer)
            hf_config.pad_token_id = tokenizer.pad_token_id
            hf_config.eos_token_id = tokenizer.eos_token_id
            hf_config.bos_token_id = tokenizer.bos_token_id
        return auto_class.from_config(hf_config)
    model = auto_class.from_pretrained(path)
    if tokenizer is not None and len(tokenizer) != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def build_causal(cfg: Config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return _build(AutoModelForCausalLM, cfg)


def build_masked(cfg: Config) -> torch.nn.Module:
    from transformers import AutoModelForMaskedLM

    return _build(AutoModelForMaskedLM, cfg)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _encode(rows: Rows, tokenizer: Any, cfg: Config, causal: bool) -> tuple[list[list[int]], list[int]]:
    """Token ids per row and the characters of the tokens a causal LM predicts (all but the first)."""
    if PACKED_COLUMN in rows:
        return [list(r) for r in rows[PACKED_COLUMN]], [int(c) for c in rows["chars"]]
    texts = [str(t or "") for t in rows[cfg.data.text_column]]
    if not causal:
        encoded = tokenizer(texts, truncation=True, max_length=cfg.data.max_length)
        return encoded["input_ids"], [0] * len(texts)
    # One row per text, ended by EOS (as packing ends documents), then cut to max_length.
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    eos = separator_id(tokenizer)
    ids, chars = [], []
    for doc, offsets in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        kept = [*doc, eos][: cfg.data.max_length]
        ids.append(kept)
        chars.append(sum(end - start for start, end in offsets[1 : len(kept)]))
    return ids, chars


def collate_causal(rows: Rows, tokenizer: Any, cfg: Config, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Blocks or texts -> input_ids, attention_mask and labels (= input_ids; the model shifts them;
    padding is -100). `stats/chars` counts the characters the labels predict."""
    ids, chars = _encode(rows, tokenizer, cfg, causal=True)
    input_ids, attention_mask = _pad(ids, tokenizer.pad_token_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "stats/chars": torch.tensor(float(sum(chars)), dtype=torch.float64),
    }


def row_seed(base: int, ids: list[int]) -> int:
    """A row's masking seed: the loop's seed for this rank and iter (0 in evaluation) and the row's tokens."""
    digest = hashlib.sha256(f"{base}:{','.join(map(str, ids))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def mask_tokens(
    input_ids: torch.Tensor, maskable: torch.Tensor, seeds: list[int], tokenizer: Any, probability: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking, row by row with each row's own generator: (masked input ids, labels with -100 where
    nothing is predicted)."""
    input_ids = input_ids.clone()
    labels = torch.full_like(input_ids, -100)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        n = input_ids.shape[1]
        chosen = (torch.rand(n, generator=g) < probability) & maskable[i]
        labels[i, chosen] = input_ids[i, chosen]
        action = torch.rand(n, generator=g)
        to_mask = chosen & (action < 0.8)
        to_random = chosen & (action >= 0.8) & (action < 0.9)
        random_ids = torch.randint(len(tokenizer), (n,), generator=g)
        input_ids[i, to_mask] = tokenizer.mask_token_id
        input_ids[i, to_random] = random_ids[to_random]
    return input_ids, labels


def collate_masked(rows: Rows, tokenizer: Any, cfg: Config, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Texts or blocks -> masked input_ids, attention_mask and labels on the masked positions only."""
    ids, _ = _encode(rows, tokenizer, cfg, causal=False)
    input_ids, attention_mask = _pad(ids, tokenizer.pad_token_id)
    special = set(tokenizer.all_special_ids)
    maskable = (attention_mask == 1) & ~torch.isin(input_ids, torch.tensor(sorted(special)))
    seeds = [row_seed(seed or 0, r) for r in ids]
    masked, labels = mask_tokens(input_ids, maskable, seeds, tokenizer, cfg.data.mlm_probability)
    return {
        "input_ids": masked,
        "attention_mask": attention_mask,
        "labels": labels,
        "stats/chars": torch.tensor(0.0, dtype=torch.float64),
    }


def _predicted(out: Any, batch: dict[str, torch.Tensor], causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = out.logits, batch["labels"].to(out.logits.device)
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)


def _loss(out: Any, batch: dict[str, torch.Tensor], causal: bool) -> torch.Tensor:
    """Mean cross-entropy over the predicted tokens; 0 (not NaN) for a batch that predicts none (a
    placeholder). No host sync: the count stays on the device."""
    logits, labels = _predicted(out, batch, causal)
    nll = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return nll / (labels != -100).sum().clamp(min=1)


def _count(counts: torch.Tensor, out: Any, batch: dict[str, torch.Tensor], causal: bool) -> None:
    logits, labels = _predicted(out, batch, causal)
    nll = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    chars = batch.get("stats/chars", torch.tensor(0.0)).to(counts)
    counts += torch.stack(
        [nll.double(), (labels != -100).sum().double(), chars, counts.new_tensor(batch["labels"].shape[0])]
    )


def finalize(counts: list[float], cfg: Config) -> Metrics:
    nll, tokens, chars, examples = counts
    loss = nll / tokens if tokens else float("nan")
    metrics: Metrics = {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"),
        "tokens": int(tokens),
        "num_examples": int(examples),
        "headline": "perplexity",
    }
    scalars = {"loss": loss, "perplexity": metrics["perplexity"], "tokens": tokens}
    if chars:
        metrics["nats_per_char"] = scalars["nats_per_char"] = nll / chars
        metrics["bits_per_char"] = scalars["bits_per_char"] = nll / chars / math.log(2)
    metrics["scalars"] = scalars
    return metrics


def format_report(metrics: Metrics) -> str:
    lines = [
        f"{'tokens':<16}{metrics['tokens']:>12}",
        f"{'loss (nats/tok)':<16}{metrics['loss']:>12.4f}",
        f"{'perplexity':<16}{metrics['perplexity']:>12.3f}",
    ]
    if "bits_per_char" in metrics:
        lines += [
            f"{'nats/char':<16}{metrics['nats_per_char']:>12.4f}",
            f"{'bits/char':<16}{metrics['bits_per_char']:>12.4f}",
        ]
    return "\n".join(lines)


@torch.no_grad()
def generate(
    model_dir: str,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """Continue `prompt` with an exported causal LM: sampling at `temperature` (0: greedy), seeded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(seed)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    if encoded["input_ids"].shape[1] == 0:  # an empty prompt starts a new document
        encoded = {
            "input_ids": torch.tensor([[separator_id(tokenizer)]]),
            "attention_mask": torch.ones(1, 1, dtype=torch.long),
        }
    sampling = temperature > 0
    out = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_k=top_k if sampling else None,
        top_p=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def predict_causal(model_dir: str, prompts: list[str]) -> list[dict[str, Any]]:
    """A greedy continuation of each prompt (use `fmdist generate` for sampling)."""
    return [{"prompt": p, "continuation": generate(model_dir, p, max_new_tokens=50, temperature=0)} for p in prompts]


@torch.no_grad()
def predict_masked(model_dir: str, texts: list[str], top_k: int = 5) -> list[dict[str, Any]]:
    """For each text, the `top_k` fillers of every mask token, with their probabilities."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    out = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", truncation=True)
        positions = (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
        if not positions:
            raise ValueError(
                f"{text!r} has no {tokenizer.mask_token}; mark the word to fill with {tokenizer.mask_token}."
            )
        probs = model(**encoded).logits[0].softmax(-1)
        fills = []
        for pos in positions:
            p, ids = probs[pos].topk(top_k)
            fills.append(
                [
                    {"token": tokenizer.decode([int(i)]).strip(), "probability": float(q)}
                    for q, i in zip(p, ids, strict=True)
                ]
            )
        out.append({"text": text, "fills": fills})
    return out


def _no_labels(cfg: Config, source: Any, field: str) -> None:
    """Language modelling learns from the text itself; there is no label set to check."""


def _placeholder(cfg: Config) -> Rows:
    if cfg.data.packing:
        return {cfg.data.text_column: [""], PACKED_COLUMN: [[0]], "chars": [0]}
    return {cfg.data.text_column: [""]}


def _task(name: str, causal: bool, **differs: Any) -> Task:
    """The two LM tasks share everything but the model class, collate, export and predict; `causal`
    decides whether labels are shifted in the loss and the counts."""
    return Task(
        name=name,
        input_column="text",
        label_column="text",
        check=check,
        check_labels=_no_labels,
        load_processor=load_tokenizer,
        placeholder=_placeholder,
        counts_size=lambda cfg: len(COUNTS),
        count=lambda counts, out, batch, cfg: _count(counts, out, batch, causal=causal),
        finalize=finalize,
        format_report=format_report,
        loss=lambda out, batch: _loss(out, batch, causal=causal),
        labelled=False,
        prepare_split=prepare_split,
        **differs,
    )


CAUSAL_LM = _task(
    "causal-lm",
    causal=True,
    build_model=build_causal,
    collate=collate_causal,
    export_class="AutoModelForCausalLM",
    pipeline_tag="text-generation",
    predict=predict_causal,
)
MASKED_LM = _task(
    "masked-lm",
    causal=False,
    build_model=build_masked,
    collate=collate_masked,
    export_class="AutoModelForMaskedLM",
    pipeline_tag="fill-mask",
    predict=predict_masked,
)
