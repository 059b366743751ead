"""Ray start/attach: the embedded local cluster by default, an existing one by address."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from raylm.storage import is_uri

if TYPE_CHECKING:
    from raylm.spec import JobSpec


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


def shared_storage_problem(spec: JobSpec, alive_nodes: list[dict[str, Any]], driver_node_id: str) -> str | None:
    """Why this job's storage will not work on this cluster, or None.

    Ray Train workers on other nodes write checkpoints straight to `storage_path`; a local
    directory that only the driver's node has would scatter them across machines.
    """
    if is_uri(spec.storage_path) or spec.storage_shared:
        return None
    here = next((n for n in alive_nodes if n.get("NodeID") == driver_node_id), {})
    resources = here.get("Resources", {})
    sc = spec.scaling
    why = None
    if len(alive_nodes) > 1:
        why = f"the cluster has {len(alive_nodes)} nodes"
    elif sc.use_gpu and resources.get("GPU", 0) < 1:
        why = "the workers need GPUs this node does not have (the autoscaler will add other nodes)"
    if why is None:
        return None
    return (f"storage_path={spec.storage_path!r} is a local directory, but {why}: workers on other "
            f"nodes cannot write checkpoints there. Use a cloud URI (storage_path=s3://bucket/runs or "
            f"gs://…), or a directory mounted on every node with storage_shared=true.")


class StorageError(ValueError):
    """The job's storage_path cannot work on the cluster it was sent to."""


def check_storage(spec: JobSpec) -> None:
    """Raises StorageError when the job's storage cannot serve a multi-node run (see above)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    problem = shared_storage_problem(spec, alive, ray.get_runtime_context().get_node_id())
    if problem:
        raise StorageError(problem)
