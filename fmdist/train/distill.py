"""Knowledge distillation: a frozen teacher's softened outputs added to the student's loss (Hinton; DistilBERT).

Distillation is not a task: it combines with any of them. At setup the teacher is resolved to an exported
model directory (`teacher_dir`), the student is the teacher's architecture with `model.from_config` applied
(`student_config`, `build_student`), it may start from every other teacher layer (`init_from_teacher`), and each
micro-batch's loss becomes `distillation_loss` of the student's and the teacher's outputs.

The teacher is held whole on every worker, frozen and in eval mode, and is not wrapped by DeepSpeed. It is
only ever run forward under `torch.no_grad()`, so it needs no gradient all-reduce, no optimizer state and no
ZeRO partitioning: wrapping it would add collectives and memory for nothing. The price is one full copy of
its weights per worker, which suits the small-to-medium teachers that fmdist fine-tunes. A teacher too large
for one device would have to be sharded with DeepSpeed's ZeRO-3 inference engine; that is a known limitation,
not supported for now.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.nn.functional as F

from fmdist.data.fs import filesystem

IGNORE_INDEX = -100
"""The label of a position that carries no loss (Hugging Face's convention)."""
PER_EXAMPLE_TASKS = ("sequence-classification", "image-classification")
PER_POSITION_TASKS = ("token-classification", "masked-lm")
SHIFTED_TASKS = ("causal-lm",)

# A layer is the numeric index right after a ModuleList of blocks: `encoder.layer.3.` (BERT, ViT),
# `layers.3.` (Llama, Mistral), `h.3.` (GPT-2, BLOOM, Falcon), `block.3.` (T5), `blocks.3.` (others). The lazy
# prefix takes the first such index, so a nested list (a stage's blocks) maps by its outer index.
_LAYER = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layer|layers|h|blocks|block)\.)(?P<index>\d+)(?P<rest>\..*)$")


def enabled(cfg: Any) -> bool:
    """Whether this run distils from a teacher.

    Args:
        cfg: The run's `Config`.

    Returns:
        True when `distill.teacher` is set.
    """
    return cfg.distill.teacher is not None


def teacher_dir(cfg: Any, scratch_dir: str) -> str:
    """The teacher as an exported Hugging Face model directory, loadable by `from_pretrained`.

    Args:
        cfg: The run's `Config`; `distill.teacher` is an exported model directory (it holds a config.json),
            a run directory or one of its checkpoints, local or on S3.
        scratch_dir: A local directory of this worker's own; a run or checkpoint is exported into
            `scratch_dir/teacher`, and an exported model on S3 is copied there.

    Returns:
        A local directory with config.json, the weights and the processor.

    Raises:
        ValueError: `distill.teacher` is unset, or is neither an exported model nor a run/checkpoint.
    """
    from fmdist.train.checkpoint import find
    from fmdist.train.export import export

    teacher = cfg.distill.teacher
    if teacher is None:
        raise ValueError("distill.teacher is not set; set it to an exported model or a run directory to distil.")
    fs, path = filesystem(teacher)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ValueError(
            f"distill.teacher: {teacher!r} is not a directory; pass an exported model directory (from "
            "`fmdist export`, holding config.json) or a run directory (run.storage_path/run.name)."
        )
    local = str(Path(scratch_dir) / "teacher")
    if fs.get_file_info(f"{path}/config.json").type == pafs.FileType.File:
        if "://" not in teacher:
            return teacher
        # from_pretrained reads local files only: bring the exported model next to this worker.
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return local
    try:
        find(teacher)
    except FileNotFoundError as e:
        raise ValueError(
            f"distill.teacher: {teacher!r} holds no config.json and no checkpoint; pass an exported model "
            "directory (from `fmdist export`) or a run directory (run.storage_path/run.name) or one of its "
            "checkpoint_step_* directories."
        ) from e
    return export(teacher, local)


def load_teacher(path: str, auto_class: type) -> torch.nn.Module:
    """The teacher model, frozen and in eval mode (see the module docstring for why it stays unwrapped).

    Args:
        path: An exported model directory (see `teacher_dir`).
        auto_class: The task's `transformers.AutoModelFor...` class.

    Returns:
        The model on CPU, with `requires_grad` False on every parameter; the caller moves it to the device.
    """
    teacher = auto_class.from_pretrained(path)
    teacher.requires_grad_(False)
    # Eval mode: no dropout, so the targets are the teacher's real predictions and identical on every rank.
    return teacher.eval()


def student_config(teacher_path: str, overrides: dict[str, Any] | None) -> Any:
    """The student's Hugging Face config: the teacher's architecture, with `model.from_config` applied.

    Args:
        teacher_path: An exported model directory (see `teacher_dir`).
        overrides: `model.from_config`, typically the depth, e.g. `{"num_hidden_layers": 3}`.

    Returns:
        A `transformers.PretrainedConfig`; labels (num_labels, id2label) are the teacher's.
    """
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(teacher_path, **(overrides or {}))


def build_student(cfg: Any, teacher: torch.nn.Module) -> torch.nn.Module:
    """A freshly initialised student: the teacher's model class and config, with `model.from_config` applied.

    Args:
        cfg: The run's `Config`; `model.from_config` sets what differs from the teacher (its depth).
        teacher: The teacher (see `load_teacher`), whose `name_or_path` is its exported directory.

    Returns:
        The student, randomly initialised; `init_from_teacher` then fills it.
    """
    return type(teacher)(student_config(teacher.name_or_path, cfg.model.from_config))


def _split_layer(name: str) -> tuple[str, int, str] | None:
    """(list prefix, layer index, rest of the name) for a tensor inside a layer, else None."""
    match = _LAYER.match(name)
    if match is None:
        return None
    return match["prefix"], int(match["index"]), match["rest"]


def init_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, Any]:
    """Start the student from the teacher, DistilBERT's way: student layer i <- teacher layer 2i.

    Every other tensor (embeddings, pooler, head, final norms) is copied where its name and shape match.
    Call it before DeepSpeed wraps the student (ZeRO-3 partitions the parameters) and before any adapter
    (LoRA renames them).

    Args:
        student: The freshly built student; same architecture as the teacher except its depth.
        teacher: The teacher (see `load_teacher`).

    Returns:
        `{"copied": tensors copied (parameters and buffers), "from_layers": teacher layer indices used}`.

    Raises:
        ValueError: The student is deeper than half the teacher (rounded up), or some student parameter
            has no teacher tensor of the same name and shape.
    """
    teacher_state = teacher.state_dict()
    teacher_depth: dict[str, int] = {}
    for name in teacher_state:
        split = _split_layer(name)
        if split is not None:
            prefix, index, _ = split
            teacher_depth[prefix] = max(teacher_depth.get(prefix, 0), index + 1)

    copied: set[str] = set()
    from_layers: set[int] = set()
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = name
            split = _split_layer(name)
            if split is not None and split[0] in teacher_depth:
                prefix, index, rest = split
                depth = teacher_depth[prefix]
                if 2 * index >= depth:
                    raise ValueError(
                        f"distill.init_from_teacher: student layer {index} ({name}) would come from teacher layer "
                        f"{2 * index}, but the teacher has {depth} layers under {prefix!r}; the student's depth "
                        f"must be at most ceil({depth} / 2) = {math.ceil(depth / 2)} (set it in model.from_config) "
                        "or turn distill.init_from_teacher off."
                    )
                source = f"{prefix}{2 * index}{rest}"
                from_layers.add(2 * index)
            theirs = teacher_state.get(source)
            if theirs is not None and theirs.shape == tensor.shape:
                # state_dict tensors share storage with the module's, so this writes the student itself.
                tensor.copy_(theirs)
                copied.add(name)

    uncopied = [name for name, _ in student.named_parameters() if name not in copied]
    if uncopied:
        raise ValueError(
            f"distill.init_from_teacher: {len(uncopied)} student parameters have no teacher tensor of the same "
            f"name and shape, e.g. {uncopied[:5]}; the student must be the teacher's architecture with fewer "
            "layers (only the depth may change in model.from_config), or turn distill.init_from_teacher off."
        )
    return {"copied": len(copied), "from_layers": sorted(from_layers)}


def _positions(
    logits: torch.Tensor, labels: torch.Tensor, task: str, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a bool mask over the positions that carry a label, the slice of the sequence they index).

    The slice is None for per-example tasks; for causal-lm it drops the last position, whose prediction
    has no next token (Hugging Face shifts the labels inside the model the same way).
    """
    if task in PER_EXAMPLE_TASKS:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device), None
    if task in PER_POSITION_TASKS:
        mask = labels != IGNORE_INDEX
        if attention_mask is not None:
            mask = mask & attention_mask.bool()
        return mask, slice(None)
    if task in SHIFTED_TASKS:
        mask = labels[:, 1:] != IGNORE_INDEX
        if attention_mask is not None:
            mask = mask & attention_mask[:, 1:].bool()
        return mask, slice(None, -1)
    raise ValueError(
        f"model.task: distillation does not know {task!r}; use one of "
        f"{', '.join(PER_EXAMPLE_TASKS + PER_POSITION_TASKS + SHIFTED_TASKS)}."
    )


def _last_hidden(out: Any, who: str) -> torch.Tensor:
    hidden: Sequence[torch.Tensor] | None = getattr(out, "hidden_states", None)
    if not hidden:
        raise ValueError(
            f"distill.hidden_mse_weight: the {who}'s outputs have no hidden_states; call the {who} with "
            "output_hidden_states=True, or set distill.hidden_mse_weight to 0."
        )
    return hidden[-1]


def distillation_loss(
    student_out: Any,
    teacher_out: Any,
    labels: torch.Tensor,
    task: str,
    alpha: float,
    temperature: float,
    hidden_mse_weight: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    student_loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """`alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)` (+ `hidden_mse_weight * MSE`).

    The T^2 factor (Hinton et al.) keeps the soft term's gradients at the magnitude of the hard term's as T
    changes, since softening by T scales them by 1/T^2. The KL is summed over classes and averaged over the
    positions that carry a label: examples (sequence/image classification), positions whose label is not
    -100 (token classification, masked-lm), or, for causal-lm, logits[:, :-1] where labels[:, 1:] is not
    -100. The teacher's outputs never carry gradient.

    Args:
        student_out: The student's model output, with `.logits` and, when alpha > 0 and no `student_loss` is
            given, `.loss` (the labels' CE).
        teacher_out: The teacher's model output for the same batch.
        labels: The batch's labels, [B] or [B, L], -100 where a position carries no loss.
        task: `model.task`.
        alpha: Weight of the loss on the labels, in [0, 1].
        temperature: Softmax temperature T, > 0.
        hidden_mse_weight: Weight of the MSE between the last hidden states over the same positions (all
            non-padding tokens for sequence classification); needs `output_hidden_states=True` outputs.
        attention_mask: When given, padding positions are left out even if their label is not -100.
        student_loss: The loss on the labels as the task computes it; `student_out.loss` when None.

    Returns:
        A scalar loss. A batch with no labelled position (a zero-weight placeholder) gives 0 times the
        logits' sum: zero, with a graph for backward, and no NaN.

    Raises:
        ValueError: The logits' or hidden states' shapes differ, or hidden states are missing.
    """
    student_logits = student_out.logits
    teacher_logits = teacher_out.logits.detach()
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distill.teacher: the teacher's logits are {tuple(teacher_logits.shape)} but the student's are "
            f"{tuple(student_logits.shape)}; the student must predict the teacher's classes or vocabulary "
            "(leave model.num_labels / label_names to the teacher's)."
        )
    mask, seq = _positions(student_logits, labels, task, attention_mask)
    n_positions = int(mask.sum())  # host-device sync: the count decides whether there is anything to average
    if n_positions == 0:
        # The labels' CE would be NaN (a mean over nothing); every rank must still run backward.
        return student_logits.sum() * 0.0

    if seq is None:
        s, t = student_logits, teacher_logits
    else:
        s, t = student_logits[:, seq][mask], teacher_logits[:, seq][mask]
    # In fp32: a softmax at temperature in bf16 loses the small probabilities the soft targets are made of.
    kl = F.kl_div(
        F.log_softmax(s.float() / temperature, dim=-1),
        F.log_softmax(t.float() / temperature, dim=-1),
        log_target=True,
        reduction="sum",
    )
    loss = (1.0 - alpha) * temperature**2 * kl / n_positions
    if alpha > 0:
        hard = student_out.loss if student_loss is None else student_loss
        if hard is None:
            raise ValueError(
                "distill.alpha: the student's output has no loss; pass labels to the student, or set distill.alpha "
                "to 0 to train on the teacher alone."
            )
        loss = loss + alpha * hard

    if hidden_mse_weight > 0:
        s_hidden, t_hidden = _last_hidden(student_out, "student"), _last_hidden(teacher_out, "teacher").detach()
        if s_hidden.shape != t_hidden.shape:
            raise ValueError(
                f"distill.hidden_mse_weight: the student's last hidden states are {tuple(s_hidden.shape)}, the "
                f"teacher's {tuple(t_hidden.shape)}; the MSE needs equal hidden sizes (keep the teacher's "
                "hidden_size), or set distill.hidden_mse_weight to 0."
            )
        if seq is None:
            # Per-example tasks: every token that is not padding.
            if attention_mask is not None and s_hidden.dim() == 3:
                keep = attention_mask.bool()
            else:
                keep = torch.ones(s_hidden.shape[:-1], dtype=torch.bool, device=s_hidden.device)
            s_h, t_h = s_hidden[keep], t_hidden[keep]
        else:
            s_h, t_h = s_hidden[:, seq][mask], t_hidden[:, seq][mask]
        loss = loss + hidden_mse_weight * F.mse_loss(s_h.float(), t_h.float())
    return loss
