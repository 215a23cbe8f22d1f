"""Distillation: the loss equals its hand computation, the student starts from every other teacher layer,
a distilled student matches its teacher better than one trained on labels, and the teacher resolves.

Single process, CPU, tiny models built from config; one in-process run (world size 1) makes a run directory.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from fmdist.config import from_dict
from fmdist.train import export
from fmdist.train.checkpoint import CHECKPOINT_PREFIX, STATE_FILE, write_manifest
from fmdist.train.distill import (
    build_student,
    distillation_loss,
    enabled,
    init_from_teacher,
    load_teacher,
    student_config,
    teacher_dir,
)
from tests.conftest import TINY_MODEL


def _bert(
    num_layers: int, num_labels: int = 3, hidden: int = 32, vocab: int = 100, intermediate: int = 64
) -> BertForSequenceClassification:
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def _hand_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) of one position, written out: sum_c p_t (log p_t - log p_s)."""
    p_t = torch.softmax(teacher / temperature, dim=-1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(student / temperature, dim=-1))).sum()


def _out(logits: torch.Tensor, loss: torch.Tensor | None = None, hidden: torch.Tensor | None = None):
    return SimpleNamespace(logits=logits, loss=loss, hidden_states=None if hidden is None else (hidden,))


# --- distillation_loss ---------------------------------------------------------------------------------


def test_loss_sequence_classification_matches_hand_computation():
    """[B, C] logits: alpha * CE + (1 - alpha) * T^2 * mean over examples of the per-example KL."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g) * 3
    labels = torch.tensor([0, 2, 1, 2])
    ce = F.cross_entropy(s, labels)
    loss = distillation_loss(_out(s, ce), _out(t), labels, "sequence-classification", alpha=0.3, temperature=2.0)
    expected = 0.3 * ce + 0.7 * 4.0 * sum(_hand_kl(s[b], t[b], 2.0) for b in range(4)) / 4
    torch.testing.assert_close(loss, expected)


def test_loss_token_classification_averages_over_labelled_positions_only():
    """[B, L, C] logits: positions labelled -100 (and padding, by attention mask) are left out of the KL."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g) * 2
    labels = torch.tensor([[1, -100, 3, 0, -100], [-100, 2, 2, 1, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # last token of row 1 is padding
    ce = torch.tensor(0.75)
    loss = distillation_loss(
        _out(s, ce), _out(t), labels, "token-classification", 0.5, 3.0, attention_mask=attention_mask
    )
    kept = [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    expected = 0.5 * ce + 0.5 * 9.0 * sum(_hand_kl(s[b, i], t[b, i], 3.0) for b, i in kept) / len(kept)
    torch.testing.assert_close(loss, expected)


def test_loss_causal_lm_compares_logits_at_t_with_labels_at_t_plus_1():
    """Causal-lm: the logits at t predict token t+1, so a position counts when labels[t + 1] is not -100."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    labels = torch.tensor([[-100, -100, 5, 1], [3, 4, 2, -100]])
    loss = distillation_loss(_out(s, torch.tensor(0.0)), _out(t), labels, "causal-lm", alpha=0.0, temperature=1.0)
    kept = [(0, 1), (0, 2), (1, 0), (1, 1)]  # (b, t) with labels[b, t + 1] != -100
    expected = sum(_hand_kl(s[b, i], t[b, i], 1.0) for b, i in kept) / len(kept)
    torch.testing.assert_close(loss, expected)


def test_loss_alpha_one_is_exactly_the_labels_loss():
    model = _bert(1).eval()
    input_ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 1])
    student, teacher = model(input_ids=input_ids, labels=labels), _bert(1)(input_ids=input_ids)
    loss = distillation_loss(student, teacher, labels, "sequence-classification", alpha=1.0, temperature=2.0)
    assert torch.equal(loss, student.loss)


def test_loss_scales_the_soft_term_by_temperature_squared():
    """Hinton's T^2: at alpha 0 the loss is T^2 times the KL of the softened distributions."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    labels = torch.zeros(3, dtype=torch.long)
    for temperature in (1.0, 4.0):
        loss = distillation_loss(_out(s), _out(t), labels, "sequence-classification", 0.0, temperature)
        kl = sum(_hand_kl(s[b], t[b], temperature) for b in range(3)) / 3
        torch.testing.assert_close(loss, temperature**2 * kl)


def test_loss_with_no_labelled_position_is_zero_and_backward_works():
    """A zero-weight placeholder batch may label nothing: the loss is 0 (not NaN) and gradients are 0."""
    s = torch.randn(1, 3, 4, requires_grad=True)
    t = torch.randn(1, 3, 4, requires_grad=True)
    labels = torch.full((1, 3), -100)
    ce = F.cross_entropy(s.view(-1, 4), labels.view(-1))  # what the model reports: NaN, a mean over nothing
    assert math.isnan(ce.item())
    loss = distillation_loss(_out(s, ce), _out(t), labels, "token-classification", 0.5, 2.0, hidden_mse_weight=1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert t.grad is None


def test_loss_sends_no_gradient_to_the_teacher():
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    loss = distillation_loss(_out(s), _out(t), torch.tensor([0, 1]), "sequence-classification", 0.0, 2.0)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_loss_hidden_mse_over_labelled_positions_and_size_mismatch_raises():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    s_h, t_h = torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    labels = torch.tensor([[2, -100, 0, 1]])
    base = distillation_loss(_out(s), _out(t), labels, "masked-lm", 0.0, 1.0)
    with_mse = distillation_loss(_out(s, hidden=s_h), _out(t, hidden=t_h), labels, "masked-lm", 0.0, 1.0, 0.5)
    kept = [0, 2, 3]
    torch.testing.assert_close(with_mse - base, 0.5 * ((s_h[0, kept] - t_h[0, kept]) ** 2).mean())
    with pytest.raises(ValueError, match=r"distill\.hidden_mse_weight.*hidden_size"):
        distillation_loss(
            _out(s, hidden=s_h), _out(t, hidden=torch.randn(1, 4, 16)), labels, "masked-lm", 0.0, 1.0, 0.5
        )


# --- init_from_teacher ---------------------------------------------------------------------------------


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _gpt2(num_layers: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=num_layers, n_head=2))


def test_init_from_teacher_bert_takes_every_other_layer(tmp_path):
    """A 4-layer teacher -> 2 layers (depth from model.from_config): student layer i is teacher layer 2i."""
    torch.manual_seed(0)
    teacher = _bert(4)
    teacher.save_pretrained(tmp_path / "teacher")
    config = student_config(str(tmp_path / "teacher"), {"num_hidden_layers": 2})
    assert (config.num_hidden_layers, config.hidden_size, config.num_labels) == (2, 32, 3)
    student = AutoModelForSequenceClassification.from_config(config)

    counts = init_from_teacher(student, teacher)

    assert counts["from_layers"] == [0, 2]
    assert counts["copied"] == len(student.state_dict())
    assert _equal(student.bert.encoder.layer[0], teacher.bert.encoder.layer[0])
    assert _equal(student.bert.encoder.layer[1], teacher.bert.encoder.layer[2])
    assert not _equal(student.bert.encoder.layer[1], teacher.bert.encoder.layer[1])
    for part in ("bert.embeddings", "bert.pooler", "classifier"):
        assert _equal(student.get_submodule(part), teacher.get_submodule(part)), part


def test_init_from_teacher_gpt2_takes_every_other_block():
    torch.manual_seed(0)
    teacher, student = _gpt2(4), _gpt2(2)

    counts = init_from_teacher(student, teacher)

    assert counts["from_layers"] == [0, 2]
    assert _equal(student.transformer.h[0], teacher.transformer.h[0])
    assert _equal(student.transformer.h[1], teacher.transformer.h[2])
    for part in ("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"):
        assert _equal(student.get_submodule(part), teacher.get_submodule(part)), part
    ids = torch.randint(0, 64, (1, 8))
    # Same embeddings, layers 0 and 2, same head: the student is the teacher without layers 1 and 3.
    teacher.transformer.h = torch.nn.ModuleList([teacher.transformer.h[0], teacher.transformer.h[2]])
    torch.testing.assert_close(student.eval()(ids).logits, teacher.eval()(ids).logits)


def test_init_from_teacher_refuses_another_architecture_or_too_deep_a_student():
    teacher = _bert(4)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight.*architecture"):
        init_from_teacher(_bert(2, intermediate=48), teacher)
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight"):
        init_from_teacher(_gpt2(2), teacher)
    with pytest.raises(ValueError, match=r"at most ceil\(4 / 2\) = 2"):
        init_from_teacher(_bert(3), teacher)


# --- a short distillation run --------------------------------------------------------------------------


def _train(student, teacher, inputs, labels, alpha: float, steps: int, seed: int):
    """Plain torch loop over random batches; alpha 1 is training on the labels alone."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(inputs), (32,), generator=g)
        with torch.no_grad():
            teacher_out = teacher(input_ids=inputs[idx])
        out = student(input_ids=inputs[idx], labels=labels[idx])
        loss = distillation_loss(out, teacher_out, labels[idx], "sequence-classification", alpha, 2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval()


@pytest.fixture
def one_thread():
    """Models this small run faster on one thread, and intra-op threads that spin on a shared 2-core
    machine can make a 5 s test take minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_distilled_student_matches_the_teacher_better_than_a_label_trained_one(one_thread):
    """The teacher learns a rule; students see the rule's labels with 40% of them replaced at random. The
    distilled student (alpha 0, T 2) ends closer to the teacher, in KL and in agreement, on held-out inputs."""
    torch.manual_seed(0)
    inputs = torch.randint(0, 30, (512, 6))
    rule = inputs[:, 0] % 3  # the class is the first token's residue: learnable by a 1-layer model
    noisy = torch.where(torch.rand(512) < 0.4, torch.randint(0, 3, (512,)), rule)
    held_out = torch.randint(0, 30, (256, 6))

    teacher = _train(_bert(1, vocab=30), _bert(1, vocab=30).eval(), inputs, rule, alpha=1.0, steps=120, seed=1)
    teacher.requires_grad_(False)
    torch.manual_seed(1)
    init = _bert(1, vocab=30).state_dict()
    students = {}
    for name, alpha in (("distilled", 0.0), ("labels", 1.0)):
        student = _bert(1, vocab=30)
        student.load_state_dict(init)  # same start, same batches: only the loss differs
        students[name] = _train(student, teacher, inputs, noisy, alpha=alpha, steps=100, seed=2)

    with torch.no_grad():
        t = teacher(input_ids=held_out).logits
        kl = {
            n: F.kl_div(
                m(input_ids=held_out).logits.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean"
            ).item()
            for n, m in students.items()
        }
        agree = {
            n: (m(input_ids=held_out).logits.argmax(-1) == t.argmax(-1)).float().mean().item()
            for n, m in students.items()
        }
    assert (t.argmax(-1) == held_out[:, 0] % 3).float().mean() > 0.9, "the teacher should have learnt the rule"
    assert kl["distilled"] < 0.5 * kl["labels"], kl
    assert agree["distilled"] >= agree["labels"], agree


# --- teacher_dir / load_teacher --------------------------------------------------------------------------


def _cfg(teacher: str | None) -> object:
    return from_dict({"model": dict(TINY_MODEL), "data": {"train": "unused"}, "distill": {"teacher": teacher}})


def test_teacher_dir_returns_an_exported_model_and_loads_it_frozen(tmp_path):
    exported = tmp_path / "exported"
    _bert(2).save_pretrained(exported)
    cfg = _cfg(str(exported))
    assert enabled(cfg) and not enabled(_cfg(None))
    assert teacher_dir(cfg, str(tmp_path / "scratch")) == str(exported)

    teacher = load_teacher(str(exported), AutoModelForSequenceClassification)

    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert _equal(teacher, BertForSequenceClassification.from_pretrained(exported))
    # The student: the teacher's class and label set, the depth of model.from_config (1 in TINY_MODEL).
    student = build_student(cfg, teacher)
    assert type(student) is BertForSequenceClassification
    assert (student.config.num_hidden_layers, student.config.num_labels) == (1, 3)
    assert init_from_teacher(student, teacher)["from_layers"] == [0]


def test_teacher_dir_refuses_what_is_neither_a_model_nor_a_run(tmp_path):
    with pytest.raises(ValueError, match=r"distill\.teacher: .*no-such-dir.* not a directory; pass an exported"):
        teacher_dir(_cfg(str(tmp_path / "no-such-dir")), str(tmp_path / "scratch"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"distill\.teacher: .*empty.* no config\.json and no checkpoint"):
        teacher_dir(_cfg(str(tmp_path / "empty")), str(tmp_path / "scratch"))


def test_teacher_dir_exports_a_run_directory_into_scratch(tmp_path, monkeypatch):
    """A run directory (checkpoints, no config.json) goes through `fmdist export` into scratch/teacher. The
    export itself is stubbed: it needs a trained run, which the export and e2e tests already make."""
    checkpoint = tmp_path / "run" / f"{CHECKPOINT_PREFIX}000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text('{"world_size": 1}')
    write_manifest(checkpoint, rank=0)  # complete, as a finished save leaves it
    calls = []

    def fake_export(run_or_checkpoint: str, out_dir: str) -> str:
        calls.append((run_or_checkpoint, out_dir))
        _bert(2).save_pretrained(out_dir)
        return out_dir

    monkeypatch.setattr(export, "export", fake_export)

    path = teacher_dir(_cfg(str(tmp_path / "run")), str(tmp_path / "scratch"))

    assert calls == [(str(tmp_path / "run"), str(tmp_path / "scratch" / "teacher"))]
    assert path == str(tmp_path / "scratch" / "teacher")
    assert load_teacher(path, AutoModelForSequenceClassification).config.num_hidden_layers == 2
