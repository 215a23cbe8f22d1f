"""cluster.yaml as `ray up` reads it: Ray's own defaults filled in and Ray's own validation (the
cluster-config JSON schema and its cross-field checks), offline; the cloud is never called. A broken
copy must be rejected, so that the check is known to bite."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict) -> dict:
    """What `ray up` does before it first calls the cloud: merge AWS defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid_and_private_with_token_auth():
    prepared = check(load())
    head_start = " ".join(prepared["head_start_ray_commands"])
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    # The dashboard and Jobs API on the head's loopback only (reached through `ray dashboard`).
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # Token auth on every node, with the token at Ray's default path on each of them.
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "RAY_AUTH_MODE=token ray start --address" in worker_start
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Workers read and write S3 through their instance role, not through keys in a runtime env.
    assert "IamInstanceProfile" in prepared["available_node_types"]["gpu_worker"]["node_config"]
    assert "AWS_SECRET_ACCESS_KEY" not in CLUSTER_YAML.read_text()


def misspelled_key(config: dict) -> None:
    config["head_start_ray_command"] = config.pop("head_start_ray_commands")


def misspelled_node_key(config: dict) -> None:
    config["available_node_types"]["gpu_worker"]["max_worker"] = 4


def wrong_type(config: dict) -> None:
    config["max_workers"] = "four"


def negative_resource(config: dict) -> None:
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = -1


def unknown_head_type(config: dict) -> None:
    config["head_node_type"] = "cpu_head"


def more_min_than_max_workers(config: dict) -> None:
    config["available_node_types"]["gpu_worker"]["min_workers"] = 5


@pytest.mark.parametrize(
    "breakage, error, match",
    [
        (misspelled_key, jsonschema.ValidationError, "head_start_ray_command"),
        (misspelled_node_key, jsonschema.ValidationError, "max_worker"),
        (wrong_type, jsonschema.ValidationError, "'four' is not of type 'integer'"),
        (negative_resource, jsonschema.ValidationError, "-1 is less than the minimum of 0"),
        (unknown_head_type, ValueError, "`head_node_type` must be one of `available_node_types`"),
        (more_min_than_max_workers, ValueError, "smaller than the sum of `min_workers`"),
    ],
)
def test_a_broken_cluster_yaml_is_rejected(breakage, error, match):
    config = load()
    breakage(config)
    with pytest.raises(error, match=match):
        check(config)
