"""Cluster attach and storage rules without starting Ray: which recorded local head is alive,
and which storage a multi-node cluster can use."""

from __future__ import annotations

import os
import socket

from raylm.job import load_job

from .conftest import REPO


def test_shared_storage_rule_for_multi_node_clusters():
    from raylm.cluster import shared_storage_problem

    def node(i: int, gpus: int = 0) -> dict:
        return {
            "NodeID": f"n{i}",
            "Alive": True,
            "Resources": {"CPU": 8.0, **({"GPU": gpus} if gpus else {})},
        }

    spec = load_job(os.path.join(REPO, "jobs", "quickstart.yaml"))
    assert shared_storage_problem(spec, [node(0)], "n0") is None
    two = shared_storage_problem(spec, [node(0), node(1)], "n0")
    assert two is not None and "2 nodes" in two and "./runs" in two
    shared = spec.model_copy(update={"storage_shared": True})
    assert shared_storage_problem(shared, [node(0), node(1)], "n0") is None
    cloud = spec.model_copy(update={"storage_path": "s3://bucket/runs"})
    assert shared_storage_problem(cloud, [node(0), node(1)], "n0") is None


def test_the_recorded_local_head_is_read_from_rays_temp_dir(tmp_path, monkeypatch):
    from raylm.cluster import recorded_head

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert recorded_head() is None  # no `ray start` ever ran here
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6380\n")
    assert recorded_head() == "127.0.0.1:6380"
    (tmp_path / "ray" / "ray_current_cluster").write_text("")
    assert recorded_head() is None


def test_a_head_is_alive_only_while_something_listens_on_its_address():
    from raylm.cluster import head_alive

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        assert head_alive(address)
    assert not head_alive(address)  # closed: a killed head leaves nothing listening
    assert not head_alive("not-an-address")
