"""Ray start/attach: the embedded local cluster by default, an existing one by address."""

from __future__ import annotations

import os
import subprocess
import sys


def ensure_ray(address: str | None = None, num_cpus: int | None = None, persistent: bool = False) -> None:
    """Connects to Ray once per process.

    With `address` (or RAY_ADDRESS) it attaches to that cluster. Otherwise it starts a local one
    sized to this machine: embedded in this process, or — with `persistent`, for work that must
    outlive the command (a detached server) — a local head via `ray start --head`, reusing one
    that is already running. Does nothing if Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    elif persistent:
        try:
            ray.init(address="auto", log_to_driver=True)
            return
        except ConnectionError:
            pass
        print("[raylm] starting a local Ray head (stop it with `ray stop`)", flush=True)
        # The dashboard stays on: Ray Train frees stopped runs' resources through its State API.
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                        f"--num-cpus={num_cpus or os.cpu_count()}", "--dashboard-host=127.0.0.1",
                        "--disable-usage-stats"], check=True, stdout=subprocess.DEVNULL)
        ray.init(address="auto", log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=True)
