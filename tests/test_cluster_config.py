"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own JSON schema) with the shape the
README promises: a CPU head, an autoscaling GPU worker type, setup that installs raylm."""

from __future__ import annotations

import json
import os

import yaml

from .conftest import REPO


def load() -> dict:
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_validates_against_rays_cluster_schema():
    import jsonschema
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    config = load()
    jsonschema.validate(config, schema)  # raises, naming the bad field, if Ray would refuse it
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_yaml_has_a_cpu_head_gpu_workers_and_installs_raylm():
    config = load()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert set(types) == {config["head_node_type"], "gpu_worker", "gpu_spot_worker"}
    for name in ("gpu_worker", "gpu_spot_worker"):
        gpu = types[name]
        assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
        assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # an AWS GPU family
    spot = types["gpu_spot_worker"]["node_config"]["InstanceMarketOptions"]
    assert spot["MarketType"] == "spot" and "MarketType" not in str(types["gpu_worker"])
    assert any("pip install" in c and "raylm" in c for c in config["setup_commands"])
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
