"""Ray start/attach: a running local head or an existing cluster by address, else a fresh local
Ray; and the check that a job's storage works on the cluster it runs on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from raylm.errors import StorageError
from raylm.storage import is_uri

if TYPE_CHECKING:
    from raylm.job import JobSpec


def say(message: str) -> None:
    """One raylm line on the console."""
    print(f"[raylm] {message}", flush=True)


def recorded_head() -> str | None:
    """The GCS address Ray recorded for the last local head started with `ray start` (its
    `ray_current_cluster` file), or None. The file outlives a head that was killed."""
    tmp = os.environ.get("RAY_TMPDIR") or (
        os.environ.get("TMPDIR") if sys.platform == "linux" else None
    )
    path = os.path.join(tmp or "/tmp", "ray", "ray_current_cluster")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def head_alive(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something answers on a `host:port` GCS address."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return True
    except (OSError, ValueError):
        return False


def ensure_ray(
    address: str | None = None, num_cpus: int | None = None, persistent: bool = False
) -> None:
    """Connects to Ray once per process.

    With `address` (or RAY_ADDRESS) it attaches to that cluster. Otherwise, if a local head is
    running (left by `raylm serve --detach`, `raylm run --detach` or `ray start --head`), it
    attaches to it and says so; if Ray recorded a head that is gone (killed, out of memory, a
    reboot), it says so and starts afresh. Starting afresh means a Ray embedded in this process
    sized to this machine, or — with `persistent`, for work that must outlive the command (a
    detached server) — a local head via `ray start --head`. Does nothing if Ray is already
    initialised.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    head = recorded_head()
    if head and head_alive(head):
        say(
            f"using the local Ray head at {head} (left running by a detached raylm or `ray start`;"
            " `ray stop` stops it)"
        )
        ray.init(address=head, log_to_driver=True)
        return
    if head:
        say(
            f"the local Ray head recorded at {head} is gone (killed or rebooted); starting a fresh "
            "local Ray"
        )
    if not persistent:
        # "local": a new Ray in this process, whatever Ray's current-cluster file says.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), log_to_driver=True)
        return
    say("starting a local Ray head (stop it with `ray stop`)")
    # The dashboard stays on: Ray Train frees stopped runs' resources through its State API.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--num-cpus={num_cpus or os.cpu_count()}",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    ray.init(address="auto", log_to_driver=True)


def shared_storage_problem(
    spec: JobSpec, alive_nodes: list[dict[str, Any]], driver_node_id: str
) -> str | None:
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
    return (
        f"storage_path={spec.storage_path!r} is a local directory, but {why}: workers on other "
        f"nodes cannot write checkpoints there. Use a cloud URI (storage_path=s3://bucket/runs or "
        f"gs://…), or a directory mounted on every node with storage_shared=true."
    )


def check_storage(spec: JobSpec) -> None:
    """Raises StorageError when the job's storage cannot serve a multi-node run (see above)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    problem = shared_storage_problem(spec, alive, ray.get_runtime_context().get_node_id())
    if problem:
        raise StorageError(problem)
