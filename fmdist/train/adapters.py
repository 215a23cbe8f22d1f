"""Parameter-efficient fine-tuning with peft (LoRA, AdaLoRA, IA3): wrap the model, train under ZeRO, merge offline.

Only the adapters and the task's new head train; the base stays frozen. Under ZeRO-3 the frozen base stays
partitioned and the optimizer holds fp32 state for the trainable parameters only. Checkpoints and exports
therefore gather only the trainable parameters (`trainable_state_dict`): peft's own `save_pretrained` on a
ZeRO-3 model writes empty adapters (peft#2892, peft#453; the gather-only-what-trains workaround is peft#2071),
and merging inside ZeRO-3 fails (peft#297). So merging is done offline, in one process, on a freshly built base
that the trainable values are loaded into (`merged_model`, `save_adapter`), as Ray's DeepSpeed fine-tuning
template does.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from fmdist.config import Config

# peft's task types decide which PeftModel subclass wraps the model. Masked LMs and image classifiers have no
# type of their own. They get the plain PeftModel, whose forward passes the batch's keywords through untouched
# and returns the model's own ModelOutput (.loss, .logits); FEATURE_EXTRACTION would add text arguments
# (input_ids=None, attention_mask=None, ...) that a vision model's forward tolerates only through **kwargs.
_TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "causal-lm": "CAUSAL_LM",
    "masked-lm": None,
    "image-classification": None,
}

# A saved or merged adapter does not train again, so AdaLoRA's schedule length only has to be valid (> tinit).
_OFFLINE_TOTAL_STEPS = 1


def enabled(cfg: Config) -> bool:
    """Whether `cfg` asks for parameter-efficient fine-tuning.

    Args:
        cfg: The run's config.

    Returns:
        True unless `peft.method` is "none".
    """
    return cfg.peft.method != "none"


def apply(model: torch.nn.Module, cfg: Config, total_steps: int) -> torch.nn.Module:
    """Wrap a freshly built transformers model with the adapters `cfg.peft` asks for, freezing the base.

    The task's new head trains fully next to the adapters (peft's `modules_to_save`): for sequence and token
    classification peft's own default (`classifier` / `score`), for image classification the model's head (its
    top-level children other than the backbone), for language models nothing. Call it on every rank, before
    `deepspeed.initialize`, and build the optimizer over the parameters that still require grad.

    Args:
        model: A plain transformers model, as the task's builder returned it.
        cfg: The run's config; `peft.method` must not be "none".
        total_steps: The run's number of optimizer steps; AdaLoRA's rank-budget schedule spans them.

    Returns:
        The `peft.PeftModel`; `model(**batch)` still returns the model's ModelOutput with `.loss` and `.logits`.

    Raises:
        ValueError: `peft.target_modules` or `peft.modules_to_save` names no module of the model, or the
            architecture has no default target modules in peft.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, _peft_config(model, cfg, total_steps))
    if cfg.peft.method == "adalora" and cfg.deepspeed.zero_stage == 3:
        _flag_zero3_during_forward(peft_model.base_model)
    return peft_model


def after_step(model: torch.nn.Module, global_step: int) -> None:
    """AdaLoRA's rank allocation for optimizer step `global_step`; nothing for other methods.

    AdaLoRA re-allocates its rank budget from gradient-based importance scores, so it must run every step
    while the step's gradients exist: after the backward of the step's last micro-batch and before
    `engine.step()` (DeepSpeed clears the gradients inside its step; without DeepSpeed, before `zero_grad()`).
    Under DeepSpeed ZeRO the parameters the model holds are partitioned or are copies of the optimizer's fp32
    master, so the scores are computed on gathered full fp32 values and gradients, and the pruned singular values
    are written back into the fp32 master. Because that happens before the step, a pruned value receives this
    step's update and is pruned again at the next call (peft's own loop prunes after the update).

    Collective under ZeRO 1-3 (one gather per AdaLoRA parameter, in the same order): every rank must call it.

    Args:
        model: The PeftModel that `apply` returned; under DeepSpeed pass `engine.module`.
        global_step: The optimizer step whose gradients are present (the one `engine.step()` applies next),
            counting from 1.
    """
    from peft.tuners.adalora import AdaLoraModel

    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, AdaLoraModel):
        return
    adapter = tuner.trainable_adapter_name
    params = {n: p for n, p in tuner.model.named_parameters() if "lora_" in n and adapter in n}
    if not any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params.values()):
        tuner.update_and_allocate(global_step)  # plain parameters with their own .grad: peft's path as is
        return

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_fp32_param

    full: dict[str, torch.nn.Parameter] = {}
    for name, param in params.items():  # collective (ZeRO): gathers in named_parameters order on every rank
        value = torch.nn.Parameter(safe_get_full_fp32_param(param).detach().clone())
        value.grad = safe_get_full_grad(param)
        if value.grad is None:
            raise RuntimeError(
                f"after_step: {name} has no gradient; call it after the backward of the step's last micro-batch "
                "and before engine.step(), which clears the gradients."
            )
        full[name] = value
    # peft's RankAllocator reads only `named_parameters()` of what it is given: hand it the full copies,
    # under the names peft's own update_and_allocate would use (those of `tuner.model`).
    view = types.SimpleNamespace(named_parameters=lambda: iter(full.items()))
    _allocate(tuner, view, global_step)
    for name, param in params.items():
        if "lora_E" in name:  # only the singular values are pruned; A and B are left as trained
            safe_set_full_fp32_param(param, full[name].data)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """Trainable and total parameter counts, also of a ZeRO-3 model whose parameters are partitioned.

    Args:
        model: Any module, e.g. `engine.module`.

    Returns:
        (trainable, total) numbers of elements.
    """
    trainable = total = 0
    for param in model.parameters():
        # ZeRO-3 leaves an empty placeholder in param.data outside a forward; ds_numel is the full size.
        numel = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total += numel
        if param.requires_grad:
            trainable += numel
    return trainable, total


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of every trainable parameter, under any ZeRO stage, never gathering the frozen base.

    Collective under ZeRO 1-3 (one gather per trainable parameter, in the same order): every rank must call it.

    Args:
        module: The PeftModel, e.g. `engine.module`.

    Returns:
        {name as `module.named_parameters()` gives it: fp32 tensor on the CPU}, e.g.
        `base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight`.
    """
    return {name: _full_fp32(param) for name, param in module.named_parameters() if param.requires_grad}


def merged_model(base_model: torch.nn.Module, cfg: Config, trainable: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The plain transformers model with the trained adapters merged in and the trained head in place.

    Run offline in one process on a freshly built base (merging inside ZeRO-3 fails, peft#297).

    Args:
        base_model: The base model built the way training built it (same seed for freshly initialised weights),
            a plain transformers model, not a DeepSpeed engine.
        cfg: The run's config.
        trainable: `trainable_state_dict` of the trained model.

    Returns:
        The transformers model, with no adapter modules and no adapter keys in its state_dict.

    Raises:
        ValueError: `trainable` lacks trainable parameters of the model, or has keys it does not have.
    """
    return _loaded(base_model, cfg, trainable).merge_and_unload()


def save_adapter(base_model: torch.nn.Module, cfg: Config, trainable: dict[str, torch.Tensor], out_dir: str) -> None:
    """Write the trained adapter (adapter_config.json + adapter_model.safetensors) for `PeftModel.from_pretrained`.

    Args:
        base_model: The base model built the way training built it, as for `merged_model`.
        cfg: The run's config.
        trainable: `trainable_state_dict` of the trained model.
        out_dir: Directory to write into; created when missing.

    Raises:
        ValueError: `trainable` does not match the model's trainable parameters, as in `merged_model`.
    """
    _loaded(base_model, cfg, trainable).save_pretrained(out_dir)


def _peft_config(model: torch.nn.Module, cfg: Config, total_steps: int) -> Any:
    from peft import AdaLoraConfig, IA3Config, LoraConfig, TaskType

    p, task = cfg.peft, cfg.model.task
    task_type = TaskType[_TASK_TYPES[task]] if _TASK_TYPES[task] else None
    targets = _target_modules(model, cfg)
    # Copies: peft extends modules_to_save in place, which must not leak into the run's config.
    to_save = list(p.modules_to_save) if p.modules_to_save is not None else _default_modules_to_save(model, task)
    if to_save:
        _check_names_exist(model, to_save, "peft.modules_to_save", endswith=True)
    common = dict(task_type=task_type, target_modules=targets, modules_to_save=to_save or None)
    if p.method == "lora":
        return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, **common)
    if p.method == "adalora":
        # peft ignores `r` for AdaLoRA: it starts every module at init_r and prunes to an average of target_r,
        # keeping peft's default ratio (12 -> 8).
        return AdaLoraConfig(
            init_r=max(p.r, round(1.5 * p.r)),
            target_r=p.r,
            lora_alpha=p.alpha,
            lora_dropout=p.dropout,
            total_step=total_steps,
            **common,
        )
    if p.method == "ia3":
        return IA3Config(feedforward_modules=_ia3_feedforward(model, targets), **common)
    raise ValueError(f"peft.method: {p.method!r} has no adapters to apply; set it to lora, adalora or ia3.")


def _target_modules(model: torch.nn.Module, cfg: Config) -> list[str] | None:
    """The user's target modules, checked; None for peft's per-architecture default, which must exist."""
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    )

    if cfg.peft.target_modules is not None:
        _check_names_exist(model, cfg.peft.target_modules, "peft.target_modules", endswith=False)
        return list(cfg.peft.target_modules)
    defaults = {
        "lora": TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        "adalora": TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        "ia3": TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    }[cfg.peft.method]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise ValueError(
            f"peft.target_modules: peft has no default target modules for model type {model_type!r}; set "
            f"peft.target_modules to some of this model's layers, e.g. {_layer_names(model)}."
        )
    return None


def _ia3_feedforward(model: torch.nn.Module, targets: list[str] | None) -> list[str] | None:
    """IA3 scales the input of feed-forward layers and the output of the others; peft must know which are which."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    if targets is None:
        return None  # peft's defaults for the architecture, target and feed-forward modules together
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # peft requires the feed-forward modules to be a subset of the targets.
    return [m for m in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, []) if m in targets]


def _default_modules_to_save(model: torch.nn.Module, task: str) -> list[str]:
    if task != "image-classification":
        # Classification: peft's SEQ_CLS / TOKEN_CLS add `classifier` and `score` themselves. LMs: the
        # output layer is usually tied to the (frozen) input embeddings and is not new.
        return []
    backbone = getattr(model, "base_model_prefix", "")
    # transformers heads sit next to the backbone (`base_model_prefix`): ViT, ConvNeXt, ResNet: `classifier`.
    head = [n for n, child in model.named_children() if n != backbone and next(child.parameters(), None) is not None]
    if not head:
        raise ValueError(
            "peft.modules_to_save: cannot tell the image classifier's head from its backbone "
            f"({type(model).__name__} has children {[n for n, _ in model.named_children()]}); set "
            "peft.modules_to_save to the head's name, e.g. [classifier]."
        )
    return head


def _check_names_exist(model: torch.nn.Module, names: list[str], field: str, endswith: bool) -> None:
    """Raise naming `field` when a name matches no module, as peft would match it."""
    modules = [n for n, _ in model.named_modules() if n]
    if endswith:  # modules_to_save: a plain suffix of the module's name
        missing = [t for t in names if not any(m.endswith(t) for m in modules)]
    else:  # target_modules: the whole name, or its last dotted components
        missing = [t for t in names if not any(m == t or m.endswith(f".{t}") for m in modules)]
    if missing:
        raise ValueError(
            f"{field}: {missing} name no module of {type(model).__name__}; use some of its layers instead, "
            f"e.g. {_layer_names(model)}."
        )


def _layer_names(model: torch.nn.Module, limit: int = 8) -> list[str]:
    """A few distinct last names of layers adapters can wrap, in model order, for error messages."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)) or (
            type(module).__name__ == "Conv1D"  # GPT-2's transposed linear layer
        ):
            short = name.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names[:limit]


def _flag_zero3_during_forward(tuner: torch.nn.Module) -> None:
    """Let AdaLoRA's orthogonality loss gather its partitioned A and B under ZeRO-3.

    peft gathers them (registered as external parameters of the tuner, so ZeRO-3 also gathers them for the
    backward) only when transformers reports ZeRO-3, which only HF Trainer / accelerate register. Without it
    the loss multiplies ZeRO-3's empty placeholders and fails. The flag is raised for the tuner's forward only,
    so that nothing else in the process (building a fresh model for merging, say) mistakes itself for ZeRO-3.
    """
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    flag = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}})  # registers itself: undo until the forward
    unset_hf_deepspeed_config()
    # The hooks hold `flag`: transformers keeps only a weak reference.
    tuner.register_forward_pre_hook(lambda *_: set_hf_deepspeed_config(flag))
    tuner.register_forward_hook(lambda *_: unset_hf_deepspeed_config(), always_call=True)


def _allocate(tuner: Any, view: Any, global_step: int) -> None:
    """peft's AdaLoraModel.update_and_allocate, on `view` instead of the tuner's own (partitioned) model."""
    config = tuner.peft_config[tuner.trainable_adapter_name]
    allocator = tuner.rankallocator
    last_scored = config.total_step - config.tfinal
    if global_step < last_scored:
        _, rank_pattern = allocator.update_and_allocate(view, global_step)
        if rank_pattern:
            config.rank_pattern = rank_pattern
    elif global_step == last_scored:
        _, config.rank_pattern = allocator.update_and_allocate(view, global_step, force_mask=True)
        allocator.reset_ipt()
    else:
        allocator.mask_using_rank_pattern(view, config.rank_pattern)


def _full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        # The optimizer's fp32 master, not the (possibly bf16) working copy. Collective: this one parameter's
        # fragments are all-reduced (ZeRO-1/2) or all-gathered (ZeRO-3).
        value = safe_get_full_fp32_param(param)
    elif hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):  # collective: ZeRO-3 without an optimizer (inference)
            value = param.data.clone()
    else:
        value = param.detach()
    return value.float().cpu().clone()


def _loaded(base_model: torch.nn.Module, cfg: Config, trainable: dict[str, torch.Tensor]) -> Any:
    """`apply` on a fresh base, then exactly the trainable values: every key used, none left over."""
    model = apply(base_model, cfg, total_steps=_OFFLINE_TOTAL_STEPS)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - trainable.keys()), sorted(trainable.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"trainable parameters do not match peft ({cfg.peft.method}) on {type(base_model).__name__}: missing "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}); build the base and set "
            "the peft section exactly as the training run did, and pass that run's trainable_state_dict."
        )
    model.load_state_dict(trainable, strict=False)  # the frozen base stays as built; checked above
    return model
