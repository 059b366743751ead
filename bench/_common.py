"""Shared by the benchmarks: write a result as JSON and say where."""

from __future__ import annotations

import json
import os
from typing import Any


def write_result(path: str, result: dict[str, Any]) -> None:
    """Writes `result` to `path` (creating its folder) and prints the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
