"""Explanations for `fmdist report`: Integrated Gradients (Captum) per word or pixel, rendered as HTML and PNG.

The report picks the cases (sampled correct and wrong predictions, the largest counterfactual gaps) and
calls in here; every record that comes back holds plain Python values, so it goes into report.json as is.

Choices, and why:

- Text: `LayerIntegratedGradients` over the model's word-embedding layer (`model.get_input_embeddings()`),
  not the whole embeddings module. That layer exists under one name in every Hugging Face model (BERT,
  RoBERTa, DistilBERT, GPT-2, ...); the whole module does not (GPT-2 adds positions inside the model).
  Interpolating the word vectors only, before position/segment embeddings and LayerNorm, keeps the path
  in the space where tokens differ: positions and segments are the same in input and baseline, so they
  would add nothing but a nonlinearity on the path.
- Text baseline: the same sequence, special tokens ([CLS]/[SEP]/BOS/EOS, as the tokenizer marks them) kept,
  every other token replaced by the pad token; the attention mask is kept, so the baseline is "a sentence
  of that length with no content". Without a pad token, [MASK], then the unknown token stand in. Special
  tokens are equal in input and baseline, so their attribution is exactly 0.
- Attributed output: the target's logit, not its probability. Completeness then reads directly: the
  attributions sum to logit(input) - logit(baseline), up to Captum's convergence `delta`. The probability
  is reported beside it.
- Token classification: an entity's score is the sum, over its words, of that word's tag logit at the
  word's first sub-token. fmdist trains a word's tag on its first sub-token only (the rest are ignored by
  the loss), so those are the logits the model was taught to use.
- Images: `IntegratedGradients` over `pixel_values` from a baseline of zeros. The pixels arrive normalised
  by the image processor, so zero is the processor's mean colour (a flat grey-ish image), not black; the
  map is |attribution| summed over channels.
"""

from __future__ import annotations

import contextlib
import html as html_lib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

RED = (214, 39, 40)
BLUE = (31, 119, 180)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the attribution, and the caller's mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _logits(output: Any) -> torch.Tensor:
    """Hugging Face models return an output object; a plain module may return the logits tensor."""
    return output.logits if hasattr(output, "logits") else output


def _probabilities(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    if getattr(getattr(model, "config", None), "problem_type", None) == "multi_label_classification":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def _label_name(model: torch.nn.Module, target: int) -> str:
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return str(id2label.get(target, id2label.get(str(target), target)))


def _baseline_token_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "mask_token_id", "unk_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has no pad, mask or unknown token to build the explanation "
        "baseline from; set one (e.g. tokenizer.pad_token = tokenizer.eos_token) before explaining."
    )


def _encode(tokenizer: Any, text: str | list[str], max_length: int, device: torch.device) -> tuple[Any, dict]:
    """The tokenizer's encoding (for word ids and offsets) and the model's tensors on its device."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; explanations need one to map "
            "sub-tokens back to words. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    encoding = tokenizer(
        text,
        is_split_into_words=isinstance(text, list),
        truncation=True,
        max_length=max_length,
        return_special_tokens_mask=True,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    tensors = {k: encoding[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoding}
    return encoding, tensors


def _baseline_ids(input_ids: torch.Tensor, special: torch.Tensor, token_id: int) -> torch.Tensor:
    return torch.where(special.to(input_ids.device).bool(), input_ids, torch.full_like(input_ids, token_id))


def _words(
    word_ids: list[int | None], attributions: list[float], name: Callable[[int, list[int]], str]
) -> list[dict[str, Any]]:
    """Sub-tokens merged into words, attributions summed; special tokens (no word, attribution 0) left out."""
    groups: dict[int, list[int]] = {}
    for i, word in enumerate(word_ids):
        if word is not None:
            groups.setdefault(word, []).append(i)
    return [
        {"word": name(word, tokens), "attribution": float(sum(attributions[i] for i in tokens)), "tokens": tokens}
        for word, tokens in groups.items()
    ]


def _layer_attribution(
    model: torch.nn.Module,
    forward: Callable[..., torch.Tensor],
    tensors: dict[str, torch.Tensor],
    baseline_ids: torch.Tensor,
    target: int | None,
    n_steps: int,
    internal_batch_size: int | None,
) -> tuple[list[float], float]:
    """Per-token attributions (summed over the embedding dimension) and Captum's convergence delta."""
    from captum.attr import LayerIntegratedGradients

    extra = tuple(tensors[k] for k in ("attention_mask", "token_type_ids") if k in tensors)
    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    attributions, delta = lig.attribute(
        tensors["input_ids"],
        baselines=baseline_ids,
        target=target,
        additional_forward_args=extra,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    # Host-device sync: the attributions come back to the host as plain floats for report.json.
    return attributions[0].sum(-1).detach().cpu().tolist(), float(delta[0])


def _keyword_forward(model: torch.nn.Module, keys: list[str]) -> Callable[..., torch.Tensor]:
    """Captum passes tensors positionally (expanded over the interpolation steps); the model wants keywords."""

    def forward(input_ids: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return _logits(model(input_ids=input_ids, **dict(zip(keys, extra, strict=True))))

    return forward


def explain_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    targets: list[int] | None = None,
    n_steps: int = 50,
    max_length: int = 128,
    internal_batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Integrated Gradients per token and per word for a sequence classifier.

    Each text is attributed on its own: no padding between texts, and memory bounded by one text's
    `n_steps` interpolations (or `internal_batch_size`).

    Args:
        model: A Hugging Face sequence classifier (or any module with `get_input_embeddings()` taking
            `input_ids`/`attention_mask` and returning logits). Its train/eval mode is restored afterwards.
        tokenizer: Its fast tokenizer.
        texts: The texts to explain.
        targets: The class to explain per text; default the predicted class.
        n_steps: Integration steps; more steps, smaller `delta`.
        max_length: Tokens kept per text (longer texts are truncated; `truncated` says so).
        internal_batch_size: Interpolated inputs per forward pass (default all `n_steps` at once).

    Returns:
        Per text: `text`, `tokens`, `attributions` (per token, summed over the embedding dimension),
        `words` (list of {word, attribution, tokens}: sub-tokens merged, special tokens left out),
        `target`, `label`, `probability` (of the target), `output` and `baseline_output` (the target's
        logit for the input and the baseline), `delta` (sum of attributions minus the output difference),
        `n_steps`, `truncated`.

    Raises:
        ValueError: `targets` does not match `texts`, or names a class the model does not have.
    """
    if targets is not None and len(targets) != len(texts):
        raise ValueError(f"explain_texts got {len(texts)} texts but {len(targets)} targets; give one per text.")
    device = next(model.parameters()).device
    baseline_token = _baseline_token_id(tokenizer)
    results = []
    with _eval_mode(model):
        for i, text in enumerate(texts):
            encoding, tensors = _encode(tokenizer, text, max_length, device)
            keys = [k for k in ("attention_mask", "token_type_ids") if k in tensors]
            forward = _keyword_forward(model, keys)
            baseline_ids = _baseline_ids(tensors["input_ids"], encoding["special_tokens_mask"], baseline_token)
            extra = [tensors[k] for k in keys]
            with torch.no_grad():
                logits = forward(tensors["input_ids"], *extra)[0]
                baseline_logits = forward(baseline_ids, *extra)[0]
            target = int(logits.argmax()) if targets is None else int(targets[i])
            if not 0 <= target < logits.shape[-1]:
                raise ValueError(
                    f"explain_texts: target {target} for text {i} is not a class of the model "
                    f"({logits.shape[-1]} labels); give an index in [0, {logits.shape[-1]})."
                )
            attributions, delta = _layer_attribution(
                model, forward, tensors, baseline_ids, target, n_steps, internal_batch_size
            )
            offsets = encoding["offset_mapping"][0].tolist()

            def span(_: int, tokens: list[int], text: str = text, offsets: list = offsets) -> str:
                return text[offsets[tokens[0]][0] : offsets[tokens[-1]][1]]

            results.append(
                {
                    "text": text,
                    "tokens": tokenizer.convert_ids_to_tokens(tensors["input_ids"][0].tolist()),
                    "attributions": attributions,
                    "words": _words(encoding.word_ids(0), attributions, span),
                    "target": target,
                    "label": _label_name(model, target),
                    "probability": float(_probabilities(model, logits)[target]),
                    "output": float(logits[target]),
                    "baseline_output": float(baseline_logits[target]),
                    "delta": delta,
                    "n_steps": n_steps,
                    "truncated": len(tokenizer(text)["input_ids"]) > max_length,
                }
            )
    return results


def _entity_tags(entity: dict[str, Any], label2id: dict[str, int], num_labels: int, words: int) -> list[int]:
    """The tag id of each word of an entity.

    `label` may be a tag id, a tag name of the label set (used on every word), or an entity type T whose
    IOB2 tags B-T / I-T are in the label set (B-T on the first word, I-T on the rest).
    """
    label = entity["label"]
    if isinstance(label, int) and 0 <= label < num_labels:
        return [label] * words
    if isinstance(label, str) and label in label2id:
        return [int(label2id[label])] * words
    begin, inside = f"B-{label}", f"I-{label}"
    if isinstance(label, str) and begin in label2id and (words == 1 or inside in label2id):
        rest = [int(label2id[inside])] * (words - 1) if words > 1 else []
        return [int(label2id[begin]), *rest]
    raise ValueError(
        f"explain_entities: entity {entity} has label {label!r}, which is neither a tag id, a tag of the "
        f"label set {sorted(label2id)}, nor an entity type with B-/I- tags there; give one of those."
    )


def explain_entities(
    model: torch.nn.Module,
    tokenizer: Any,
    words: list[str],
    entities: list[dict[str, Any]],
    n_steps: int = 50,
    max_length: int = 128,
    internal_batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Integrated Gradients per token and per word for entities of a token classifier.

    An entity's score is the sum over its words of the word's tag logit at the word's first sub-token
    (where fmdist trains the tag); that score is what is attributed, so completeness reads as for texts.

    Args:
        model: A Hugging Face token classifier. Its train/eval mode is restored afterwards.
        tokenizer: Its fast tokenizer.
        words: The sentence, as the list of words the model was trained on.
        entities: Each {start_word, end_word, label}: word indices, both inclusive (as seqeval's
            `get_entities` gives them), and a tag id, a tag name, or an entity type with B-/I- tags.
        n_steps: Integration steps.
        max_length: Tokens kept; an entity cut by truncation is an error.
        internal_batch_size: Interpolated inputs per forward pass (default all `n_steps` at once).

    Returns:
        Per entity, the record of `explain_texts` (`text` is the words joined by spaces, `words` are the
        given words) with `target` the tag id per entity word, `label` the entity's label, `probability`
        the mean over its words of the tag's probability, and `entity` (the entity as given).

    Raises:
        ValueError: An entity's span or label is not in the sentence or the label set, or was truncated.
    """
    device = next(model.parameters()).device
    baseline_token = _baseline_token_id(tokenizer)
    encoding, tensors = _encode(tokenizer, list(words), max_length, device)
    keys = [k for k in ("attention_mask", "token_type_ids") if k in tensors]
    baseline_ids = _baseline_ids(tensors["input_ids"], encoding["special_tokens_mask"], baseline_token)
    extra = [tensors[k] for k in keys]
    word_ids = encoding.word_ids(0)
    first_token = {}
    for i, word in enumerate(word_ids):
        if word is not None:
            first_token.setdefault(word, i)
    label2id = dict(getattr(model.config, "label2id", None) or {})
    logits_of = _keyword_forward(model, keys)
    results = []
    with _eval_mode(model):
        with torch.no_grad():
            logits = logits_of(tensors["input_ids"], *extra)[0]
            baseline_logits = logits_of(baseline_ids, *extra)[0]
        for entity in entities:
            start, end = entity.get("start_word"), entity.get("end_word")
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < len(words)):
                raise ValueError(
                    f"explain_entities: entity {entity} needs integer start_word <= end_word (inclusive) "
                    f"inside the sentence's {len(words)} words."
                )
            if end not in first_token:
                raise ValueError(
                    f"explain_entities: entity {entity} was cut by truncation at max_length {max_length}; "
                    "raise max_length."
                )
            positions = torch.tensor([first_token[w] for w in range(start, end + 1)], device=device)
            tags = torch.tensor(_entity_tags(entity, label2id, logits.shape[-1], end - start + 1), device=device)

            def score(input_ids: torch.Tensor, *more: torch.Tensor, positions=positions, tags=tags) -> torch.Tensor:
                return logits_of(input_ids, *more)[:, positions, tags].sum(-1)

            attributions, delta = _layer_attribution(
                model, score, tensors, baseline_ids, None, n_steps, internal_batch_size
            )
            probabilities = _probabilities(model, logits)[positions, tags]
            results.append(
                {
                    "text": " ".join(words),
                    "tokens": tokenizer.convert_ids_to_tokens(tensors["input_ids"][0].tolist()),
                    "attributions": attributions,
                    "words": _words(word_ids, attributions, lambda word, _: words[word]),
                    "target": tags.tolist(),
                    "label": str(entity["label"]),
                    "probability": float(probabilities.mean()),
                    "output": float(logits[positions, tags].sum()),
                    "baseline_output": float(baseline_logits[positions, tags].sum()),
                    "delta": delta,
                    "n_steps": n_steps,
                    "truncated": len(first_token) < len(words),
                    "entity": dict(entity),
                }
            )
    return results


def explain_images(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    targets: list[int] | None = None,
    n_steps: int = 50,
    internal_batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Integrated Gradients per pixel for an image classifier, from a baseline of zeros.

    Args:
        model: An image classifier taking `pixel_values` [N, C, H, W] as its first argument and returning
            logits (or an output with `.logits`). Its train/eval mode is restored afterwards.
        pixel_values: The images, already normalised by the image processor.
        targets: The class to explain per image; default the predicted class.
        n_steps: Integration steps.
        internal_batch_size: Interpolated images per forward pass (default all at once).

    Returns:
        Per image: `attribution` (nested list [H, W]: |attribution| summed over channels),
        `attribution_sum` (the signed sum over all pixels and channels, for completeness), `target`,
        `label`, `probability`, `output`, `baseline_output` (the target's logit), `delta`, `n_steps`.

    Raises:
        ValueError: `pixel_values` is not [N, C, H, W], or `targets` does not match it.
    """
    from captum.attr import IntegratedGradients

    if pixel_values.dim() != 4:
        raise ValueError(
            f"explain_images: pixel_values has shape {tuple(pixel_values.shape)}; give [N, C, H, W] "
            "(the image processor's `pixel_values`)."
        )
    if targets is not None and len(targets) != len(pixel_values):
        raise ValueError(f"explain_images got {len(pixel_values)} images but {len(targets)} targets.")
    device = next(model.parameters()).device
    pixels = pixel_values.to(device=device, dtype=next(model.parameters()).dtype)
    baseline = torch.zeros_like(pixels)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _logits(model(x))

    with _eval_mode(model):
        with torch.no_grad():
            logits, baseline_logits = forward(pixels), forward(baseline)
        chosen = logits.argmax(-1).tolist() if targets is None else [int(t) for t in targets]
        bad = [t for t in chosen if not 0 <= t < logits.shape[-1]]
        if bad:
            raise ValueError(f"explain_images: targets {bad} are not classes of the model ({logits.shape[-1]}).")
        attributions, delta = IntegratedGradients(forward).attribute(
            pixels,
            baselines=baseline,
            target=chosen,
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
    probabilities = _probabilities(model, logits)
    # Host-device sync: maps and numbers come back to the host as plain Python values.
    return [
        {
            "attribution": attributions[i].abs().sum(0).detach().cpu().tolist(),
            "attribution_sum": float(attributions[i].sum()),
            "target": target,
            "label": _label_name(model, target),
            "probability": float(probabilities[i, target]),
            "output": float(logits[i, target]),
            "baseline_output": float(baseline_logits[i, target]),
            "delta": float(delta[i]),
            "n_steps": n_steps,
        }
        for i, target in enumerate(chosen)
    ]


def _colour(value: float, scale: float) -> str:
    red, green, blue = RED if value >= 0 else BLUE
    alpha = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    return f"rgba({red}, {green}, {blue}, {alpha:.3f})"


def html(explanations: list[dict[str, Any]], title: str) -> str:
    """A self-contained HTML fragment: each example's words coloured by attribution.

    Red words push towards the explained label, blue words away; the colour is scaled per example to its
    largest |attribution|. Inline styles only, no script; every piece of text is HTML-escaped.

    Args:
        explanations: Records from `explain_texts` or `explain_entities` (a `kind` key, as the report
            adds, is shown too).
        title: The section's heading.

    Returns:
        The fragment.
    """
    esc = html_lib.escape
    parts = [
        '<section style="font-family: sans-serif; margin: 1em 0;">',
        f'<h3 style="margin: 0.3em 0;">{esc(title)}</h3>',
        '<p style="color: #555; font-size: 0.9em; margin: 0.3em 0;">Red pushes towards the explained label, '
        "blue away; colours are scaled per example. &delta; is the Integrated Gradients approximation error "
        "(attributions minus output difference).</p>",
    ]
    for e in explanations:
        words = e.get("words") or []
        scale = max((abs(w["attribution"]) for w in words), default=0.0)
        header = [f"<b>{esc(str(e['label']))}</b>", f"p {e['probability']:.3f}", f"&delta; {e['delta']:.2g}"]
        if e.get("kind"):
            header.insert(0, f"<i>{esc(str(e['kind']))}</i>")
        if e.get("entity"):
            entity = e["entity"]
            header.append(f"entity words {int(entity['start_word'])}&ndash;{int(entity['end_word'])}")
        spans = " ".join(
            f'<span title="{w["attribution"]:+.4f}" style="background: {_colour(w["attribution"], scale)}; '
            f'padding: 0 2px; border-radius: 3px;">{esc(str(w["word"]))}</span>'
            for w in words
        )
        parts += [
            '<div style="margin: 0.6em 0; padding: 0.4em; border: 1px solid #ddd; border-radius: 4px;">',
            f'<div style="font-size: 0.85em; color: #333;">{" &middot; ".join(header)}</div>',
            f'<div style="line-height: 1.9;">{spans}</div>',
            "</div>",
        ]
    parts.append("</section>")
    return "\n".join(parts)


def heatmap_png(explanation: dict[str, Any], path: str) -> Any:
    """A bar strip of an explanation's word attributions (one bar per word), written as a PNG.

    Args:
        explanation: A record from `explain_texts` or `explain_entities`.
        path: Where the PNG goes.

    Returns:
        The matplotlib Figure (already saved; nothing to close: it is not registered with pyplot).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    words = explanation.get("words") or []
    values = [w["attribution"] for w in words]
    fig = Figure(figsize=(max(4.0, 0.45 * len(words) + 1.5), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color=[np.array(RED if v >= 0 else BLUE) / 255 for v in values])
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(words)), [str(w["word"]) for w in words], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("attribution (logit)")
    ax.set_title(
        f"{explanation['label']} (p {explanation['probability']:.2f}), delta {explanation['delta']:.2g}", fontsize=9
    )
    fig.savefig(path, dpi=100)
    return fig


def _resize(attribution: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize: the processor's resolution (e.g. 224) is usually not the original image's."""
    if attribution.shape == (height, width):
        return attribution
    tensor = torch.as_tensor(attribution, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear")[0, 0].numpy()


def overlay_png(image: np.ndarray, attribution: Any, path: str) -> Any:
    """The image beside the image with its saliency laid over it, written as a PNG.

    Args:
        image: [H, W] or [H, W, C] (C in 1, 3, 4), values in 0..1.
        attribution: The map [h, w] from `explain_images` (nested list or array); resized to [H, W] when the
            processor resized the image.
        path: Where the PNG goes.

    Returns:
        The matplotlib Figure (already saved; not registered with pyplot).

    Raises:
        ValueError: The image's shape or value range is not as above.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"overlay_png: image has shape {image.shape}; give [H, W] or [H, W, C] with C in 1, 3, 4.")
    if image.size and (image.min() < 0 or image.max() > 1):
        raise ValueError(
            f"overlay_png: image values span {image.min():.3g}..{image.max():.3g}; give 0..1 (divide 8-bit "
            "pixels by 255)."
        )
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    saliency = _resize(np.abs(np.asarray(attribution, dtype=np.float32)), image.shape[0], image.shape[1])
    peak = float(saliency.max()) if saliency.size else 0.0
    saliency = saliency / peak if peak > 0 else saliency
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    cmap = "gray" if image.ndim == 2 else None
    left.imshow(image, cmap=cmap, vmin=0, vmax=1)
    left.set_title("image", fontsize=9)
    right.imshow(image, cmap=cmap, vmin=0, vmax=1)
    # Transparent where attribution is low, so the image shows through what the model ignored.
    right.imshow(saliency, cmap="inferno", alpha=0.8 * saliency, vmin=0, vmax=1)
    right.set_title("Integrated Gradients |attribution|", fontsize=9)
    for ax in (left, right):
        ax.axis("off")
    fig.savefig(path, dpi=100)
    return fig
