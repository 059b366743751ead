"""Models: builders shared by training and serving (`build`: tokenizer, model with the task's
head, LoRA), raylm's model cache (`cache`), the builtin tiny Llama (`tiny_llama`), models shipped
in pip packages (`packaged`) and GGUF conversion (`gguf`)."""

from raylm.models.build import (
    apply_lora,
    auto_class,
    build_model,
    build_tokenizer,
    label_kwargs,
    resolve_model_path,
    torch_dtype,
)
from raylm.models.cache import cache_dir, materialize
from raylm.models.tiny_llama import build_char_tokenizer, materialize_tiny_llama

__all__ = [
    "apply_lora",
    "auto_class",
    "build_char_tokenizer",
    "build_model",
    "build_tokenizer",
    "cache_dir",
    "label_kwargs",
    "materialize",
    "materialize_tiny_llama",
    "resolve_model_path",
    "torch_dtype",
]
