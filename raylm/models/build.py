"""Tokenizer and model builders: `from_pretrained` for hub ids, local dirs and builtins (made or
located by `raylm.models.builtin`), the task's `AutoModelFor…` head, and LoRA."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from raylm import builtins
from raylm.errors import InputError
from raylm.job import JobSpec
from raylm.tasks import TASKS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or local HF directory as given; a `builtin:` name, or a local directory holding
    only a GGUF model, becomes its materialised HF directory in raylm's cache.

    Raises InputError for an unknown builtin or one whose package is not installed.
    """
    from raylm.models.gguf import is_gguf_only, materialize_gguf

    if not builtins.is_builtin(name_or_path):
        local = os.path.expanduser(name_or_path)
        return str(materialize_gguf(local)) if is_gguf_only(local) else name_or_path
    model = builtins.MODELS.get(name_or_path)
    if model is None:
        raise InputError(f"unknown builtin model {name_or_path!r}; one of {list(builtins.MODELS)}")
    if model.missing_package():
        raise InputError(f"{name_or_path} needs the {model.distribution} package: {model.install}")
    return str(model.path())


def torch_dtype(spec: JobSpec) -> torch.dtype:
    """The dtype weights are loaded in: `model.dtype`, or the training precision's."""
    import torch

    name = spec.model.dtype
    if name == "auto":
        name = {"bf16": "bfloat16", "fp16": "float16"}.get(spec.precision, "float32")
    return getattr(torch, name)


def build_tokenizer(spec: JobSpec, path: str | None = None) -> PreTrainedTokenizerBase:
    """Loads the job's tokenizer; gives it a pad token (the eos) if it has none."""
    from transformers import AutoTokenizer

    path = path or resolve_model_path(spec.model.name_or_path)
    tok = AutoTokenizer.from_pretrained(
        path, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def auto_class(task: str) -> Any:
    """The transformers `AutoModelFor…` class for a task."""
    import transformers

    return getattr(transformers, TASKS[task].auto_class)


def label_kwargs(labels: list[str] | None) -> dict[str, Any]:
    """`from_pretrained` arguments that size a classifier head and name its labels."""
    if labels is None:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def build_model(
    spec: JobSpec, path: str | None = None, labels: list[str] | None = None
) -> PreTrainedModel:
    """Loads the base model with the task's head (`labels` names a classifier's classes) and
    applies LoRA if the job asks for it. Raises ValueError for a classifier without labels."""
    import torch

    task = TASKS[spec.model.task]
    if task.labelled and not labels:
        raise ValueError(f"a {task.name} model needs its label names")
    path = path or resolve_model_path(spec.model.name_or_path)
    # A classifier's head is new: seed it like the adapter, so every worker starts identical.
    torch.manual_seed(spec.training.seed)
    model = auto_class(task.name).from_pretrained(
        path,
        dtype=torch_dtype(spec),
        revision=spec.model.revision,
        trust_remote_code=spec.model.trust_remote_code,
        use_safetensors=True,  # never unpickle weights
        **label_kwargs(labels if task.labelled else None),
    )
    if spec.model.gradient_checkpointing:
        # transformers 5 renamed it; older releases only have the gradient_* name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.config.use_cache = False
        if spec.lora.enabled:
            model.enable_input_require_grads()
    if spec.lora.enabled:
        # Same seed on every worker: identical adapter init, whatever the ZeRO stage.
        torch.manual_seed(spec.training.seed)
        model = apply_lora(spec, model)
    return model


def apply_lora(spec: JobSpec, model: PreTrainedModel) -> PreTrainedModel:
    """Wraps `model` in a peft LoRA adapter from the job's `lora` section."""
    from peft import LoraConfig, TaskType, get_peft_model

    lc, task = spec.lora, TASKS[spec.model.task]
    extra: dict[str, Any] = {}
    save = list(lc.modules_to_save or [])
    if task.head_modules:
        # The head starts random: it trains fully and is saved with the adapter, and must not
        # also get a LoRA (peft's `all-linear` would wrap a token classifier's head).
        save += [m for m in task.head_modules if m not in save]
        extra["exclude_modules"] = list(task.head_modules)
    config = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        modules_to_save=save or None,
        task_type=getattr(TaskType, task.peft_task_type),
        **extra,
    )
    return get_peft_model(model, config)
