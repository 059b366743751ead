"""Ray start/attach: the embedded local cluster by default, an existing one by address."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connects to Ray once per process.

    With `address` (or RAY_ADDRESS) it attaches to that cluster; otherwise it starts a local
    one sized to this machine. Does nothing if Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=True)
