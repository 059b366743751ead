"""Loading checkpoints, exports and plain HF model directories for inference (plain transformers
+ peft, the task's Auto class, several LoRA adapters over one base) and exporting a LoRA
checkpoint merged into its base."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylm.checkpoint.format import (
    META_FILE,
    check_checkpoint,
    read_metadata,
    refuse_pickles,
    require_model_dir,
    seal,
)
from raylm.errors import PathError
from raylm.tasks import task_from_architectures


def inference_metadata(directory: str | Path) -> dict[str, Any]:
    """raylm.json of a checkpoint or export; `{}` for a plain HF model directory."""
    if not Path(directory, META_FILE).exists() and Path(directory, "config.json").exists():
        return {}
    return read_metadata(directory)


def task_of(directory: str | Path) -> str:
    """What a checkpoint, export or plain HF model directory does: `causal_lm`,
    `sequence_classification` or `token_classification` (from raylm.json, else config.json)."""
    meta = inference_metadata(directory)
    if meta.get("task"):
        return str(meta["task"])
    try:
        architectures = (
            json.loads(Path(directory, "config.json").read_text()).get("architectures") or []
        )
    except (OSError, ValueError):
        architectures = []
    return task_from_architectures(architectures)


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Any:
    """Only transformers' errors are logged inside (when `quiet`)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_for_inference(
    directory: str | Path, trust_remote_code: bool = False, more_adapters: Sequence[str | Path] = ()
) -> tuple[Any, Any]:
    """Loads (tokenizer, model) with plain transformers + peft, in eval mode, with the task's
    `AutoModelFor…` head (a classifier's label names from the checkpoint).

    `directory` is a raylm checkpoint (LoRA or full), an export, or a plain HF model directory.
    `more_adapters` are further LoRA checkpoints over the same base, loaded as peft adapters
    `"1"`, `"2"`, … next to `"default"`. Raises ValueError for pickles, a checkpoint that fails
    its checksums, or mismatched bases.
    """
    from transformers import AutoTokenizer

    from raylm.models import auto_class, label_kwargs

    for d in (directory, *more_adapters):
        refuse_pickles(d)
        check_checkpoint(d)
    meta = inference_metadata(directory)
    auto = auto_class(task_of(directory))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not Path(directory, "adapter_config.json").exists():
        if more_adapters:
            raise ValueError(
                f"{directory} holds full weights; extra LoRA adapters need a LoRA checkpoint"
            )
        # A full checkpoint's config.json already names its labels.
        model = auto.from_pretrained(
            directory, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        return tokenizer, model.eval()
    from peft import PeftModel

    # The base gets a head of the right size; the adapter's saved copy of the head replaces it,
    # so transformers' report of a "missing" head is noise here, not news.
    with _quiet_transformers(meta.get("labels") is not None):
        base = auto.from_pretrained(
            meta["base_model"],
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **label_kwargs(meta.get("labels")),
        )
    model = PeftModel.from_pretrained(base, directory)
    for i, extra in enumerate(more_adapters, start=1):
        other = inference_metadata(extra).get("base_model")
        if not Path(extra, "adapter_config.json").exists() or other != meta["base_model"]:
            raise ValueError(
                f"{extra} is not a LoRA adapter over {meta['base_model']} (base: {other})"
            )
        model.load_adapter(str(extra), adapter_name=str(i))
    return tokenizer, model.eval()


@dataclass
class Served:
    """Models loaded for serving: one base with an adapter per served name (or one full model)."""

    names: list[str]
    metadata: dict[str, dict[str, Any]]
    tokenizer: Any
    model: Any
    adapter: dict[str, str]  # served name → peft adapter name
    multi: bool  # more than one adapter: each batch must say which


def load_served(
    models: Sequence[tuple[str, str | Path]], trust_remote_code: bool | None = None
) -> Served:
    """Loads (served name, checkpoint dir) pairs, the first being the default, for an inference
    engine; a name may alias another's dir. `trust_remote_code` None lets the job that trained the
    first checkpoint decide. Raises ValueError for no models, duplicate names or what
    `load_for_inference` refuses."""
    if not models:
        raise ValueError("no model to serve")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    paths = list(dict.fromkeys(str(p) for _, p in models))
    metas = [inference_metadata(p) for _, p in models]
    if trust_remote_code is None:
        trust_remote_code = bool(metas[0].get("spec", {}).get("model", {}).get("trust_remote_code"))
    tokenizer, model = load_for_inference(paths[0], trust_remote_code, paths[1:])
    # load_for_inference names adapters "default", "1", "2", … in the order of `paths`.
    adapter = {
        n: "default" if paths.index(str(p)) == 0 else str(paths.index(str(p))) for n, p in models
    }
    return Served(
        names, dict(zip(names, metas, strict=True)), tokenizer, model, adapter, len(paths) > 1
    )


def export_merged(
    directory: str | Path, out_dir: str | Path, trust_remote_code: bool = False
) -> Path:
    """Writes a plain HF model directory (safetensors + tokenizer) that the task's
    `AutoModelFor…` class loads alone: a LoRA adapter is merged into its base (a classifier's
    trained head with it); full weights are re-saved.

    Returns `out_dir`; raises PathError for a checkpoint that cannot be loaded, and rather than
    overwrite a file or a non-empty directory.
    """
    require_model_dir(directory)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PathError(out, "is a file; give a new directory for the export")
    if out.exists() and any(out.iterdir()):
        raise PathError(out, "exists and is not empty; give a new directory for the export")
    tokenizer, model = load_for_inference(directory, trust_remote_code=trust_remote_code)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = read_metadata(directory)
    meta.update(exported_from=str(directory), base_model=None, exported_unix=time.time())
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    seal(out)
    return out
