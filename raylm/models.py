"""Tokenizer and model builders: `from_pretrained` for hub ids and local dirs, the builtin tiny
Llama (made locally, saved as a normal HF directory, then loaded by the same path), the packaged
MiniLM encoder, the task's `AutoModelFor…` head, and LoRA."""

from __future__ import annotations

import importlib
import os
import random
import shutil
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylm import builtins
from raylm.errors import InputError
from raylm.job import JobSpec
from raylm.tasks import TASKS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Bump when the builtin's config, tokenizer or pretraining changes, so stale caches are not reused.
TINY_LLAMA_VERSION = "v2"
# A random-init base gives LoRA nothing to adapt, so the builtin is briefly pretrained on digit
# text (subtraction and counting; never addition, which builtin:arithmetic asks) when first built.
TINY_LLAMA_PRETRAIN_STEPS = 1000
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}
# Llama-style system/user/assistant turns. Its `{% generation %}` markers serve tools that ask
# for `return_assistant_tokens_mask`; raylm finds assistant turns by rendering prefixes instead
# (raylm.data.tokenize_chat), so templates without markers train as well.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_dir() -> Path:
    """Where builtin models are materialised (`RAYLM_CACHE`, default ~/.cache/raylm)."""
    return Path(os.environ.get("RAYLM_CACHE", Path.home() / ".cache" / "raylm"))


def build_char_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer made with the `tokenizers` library (no download)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = list(string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", ""))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def materialize_tiny_llama(seed: int = 0) -> Path:
    """Builds the builtin tiny Llama once, saves it as an HF directory, returns its path.

    Concurrent workers may race here: each builds in a private temp dir and renames it into
    place; the loser discards its copy, so readers never see a half-written directory.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = cache_dir() / "models" / f"tiny-llama-{TINY_LLAMA_VERSION}-seed{seed}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        tokenizer = build_char_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_LLAMA_CONFIG,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            _pretrain_digits(model, tokenizer, seed, TINY_LLAMA_PRETRAIN_STEPS)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _digit_text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
        return f"{a}-{b}={a - b}"
    start = rng.randrange(95)
    return " ".join(str(start + i) for i in range(rng.randrange(2, 6)))


def _pretrain_digits(model: Any, tokenizer: Any, seed: int, steps: int) -> None:
    """A few seconds of full training on digit text, single-threaded so every machine gets
    bit-identical weights (adapters trained on one node must fit the base on another)."""
    import torch

    rng = random.Random(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(steps):
            rows = [
                tokenizer(_digit_text(rng))["input_ids"] + [tokenizer.eos_token_id]
                for _ in range(32)
            ]
            width = max(map(len, rows))
            ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
            labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
            model(
                input_ids=ids, attention_mask=(labels != -100).long(), labels=labels
            ).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or local dir as given; a `builtin:` name becomes its materialised directory."""
    if not builtins.is_builtin(name_or_path):
        return name_or_path
    if name_or_path == builtins.TINY_LLAMA:
        return str(materialize_tiny_llama())
    model = builtins.MODELS.get(name_or_path)
    if model is None or model.package is None:
        raise InputError(f"unknown builtin model {name_or_path!r}; one of {list(builtins.MODELS)}")
    try:
        package = importlib.import_module(model.package)
    except ImportError:
        raise InputError(
            f"{name_or_path} needs the {model.distribution} package: {model.install}"
        ) from None
    return str(package.get_model_path())


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
