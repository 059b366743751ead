"""GGUF model files (llama.cpp's format) turned into standard HF directories: transformers reads
and dequantizes GGUF itself (with the `gguf` package) but will not `save_pretrained` the result,
so the dequantized weights go into a model built from its config and are saved as safetensors
once, in raylm's cache; everything after loads that directory with plain `from_pretrained`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from raylm.models.cache import cache_dir, materialize

GGUF_SUFFIX = ".gguf"


def gguf_files(directory: str | Path) -> list[str]:
    """The GGUF files directly in `directory`, sorted."""
    try:
        return sorted(f for f in os.listdir(directory) if f.endswith(GGUF_SUFFIX))
    except OSError:
        return []


def is_gguf_only(directory: str | Path) -> bool:
    """A directory holding a GGUF model and no HF config: it needs converting before loading."""
    return bool(gguf_files(directory)) and not Path(directory, "config.json").exists()


def convert_gguf(directory: str | Path, filename: str, out: Path) -> None:
    """Writes the GGUF model `directory/filename` as an HF directory (fp32 safetensors, its
    tokenizer and chat template) into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32
    )
    settings = loaded.config.to_dict()
    # Dequantized already: the saved model is a plain fp32 one.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def materialize_gguf(
    directory: str | Path, filename: str | None = None, name: str | None = None
) -> Path:
    """The cached HF directory converted from a GGUF model (built on first use). The cache key
    is `name`, else the file's path, size and modification time, so an edited file converts
    again."""
    filename = filename or gguf_files(directory)[0]
    source = Path(directory, filename)
    if name is None:
        stat = source.stat()
        key = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        name = f"gguf-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    target = cache_dir() / "models" / name
    return materialize(target, lambda out: convert_gguf(directory, filename, out))
