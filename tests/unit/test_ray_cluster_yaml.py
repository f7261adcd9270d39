"""ray_cluster.yaml: valid for the installed Ray's cluster launcher, and consistent with itself and the project."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_PATH = REPO / "ray_cluster.yaml"
# GPUs per instance for the AWS types a GPU node type may use; a type missing here fails the test.
GPUS_PER_INSTANCE = {
    "g4dn.xlarge": 1,
    "g5.xlarge": 1,
    "g5.2xlarge": 1,
    "g5.12xlarge": 4,
    "g5.48xlarge": 8,
    "g6.xlarge": 1,
    "p3.2xlarge": 1,
    "p3.16xlarge": 8,
    "p4d.24xlarge": 8,
    "p5.48xlarge": 8,
}
SECRET_SHAPES = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),  # AWS secret keys
    # NAME=literal or name: literal for anything secret-like; `$VAR`, `$(cmd)` and file paths are fine.
    re.compile(r"(?i)(secret|password|passwd|token)[A-Z_]*\s*[:=]\s*['\"]?(?![$~/'\"\s])[^\s'\"]{8,}"),
]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text())


def test_valid_against_the_schema_in_the_ray_package(config) -> None:
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_ray_up_would_accept_it(config) -> None:
    # What `ray up` does before it talks to AWS: merge the provider defaults, then validate.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head.cpu"


def test_node_types_are_consistent(config) -> None:
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    assert workers, "no worker node types"
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"], name
    assert sum(spec.get("min_workers", 0) for spec in workers.values()) <= config["max_workers"]


def test_gpu_node_types_declare_their_gpus(config) -> None:
    types = config["available_node_types"]
    gpu_types = []
    for name, spec in types.items():
        instance = spec["node_config"]["InstanceType"]
        if instance.startswith(("g", "p")):
            assert instance in GPUS_PER_INSTANCE, f"{name}: add {instance}'s GPU count to GPUS_PER_INSTANCE"
            assert spec["resources"].get("GPU") == GPUS_PER_INSTANCE[instance], name
            gpu_types.append(name)
        else:
            assert spec["resources"].get("GPU", 0) == 0, name
    assert gpu_types and config["head_node_type"] not in gpu_types
    # Autoscaling: GPU nodes exist only while work needs them.
    assert all(types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1 for name in gpu_types)


def test_image_runs_the_same_ray_with_cuda(config) -> None:
    image = config["docker"]["image"]
    assert config["docker"]["container_name"]
    repository, tag = image.rsplit(":", 1)
    assert repository == "rayproject/ray"
    # A client and a cluster of different Ray versions do not talk; the GPU variant carries CUDA.
    assert tag.startswith(f"{ray.__version__}-") and (tag.endswith("-gpu") or "-cu" in tag), image


def test_every_node_starts_ray_with_token_auth(config) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config[key] if "ray start" in command]
        assert starts, key
        for command in starts:
            assert "RAY_AUTH_MODE=token" in command, command
            assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in command, command
    # The token file reaches the nodes from the submitter's machine, not from this file.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_no_literal_secrets() -> None:
    for number, line in enumerate(CONFIG_PATH.read_text().splitlines(), 1):
        for shape in SECRET_SHAPES:
            assert not shape.search(line), f"ray_cluster.yaml:{number} looks like a secret: {line.strip()}"


def test_the_secret_check_catches_secrets() -> None:
    for line in (
        "AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP",
        "aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "RAY_AUTH_TOKEN=3f1c2a9b8e7d6c5b4a39281706f5e4d3",
        "MINIO_ROOT_PASSWORD: hunter2hunter2",
    ):
        assert any(shape.search(line) for shape in SECRET_SHAPES), line
    for line in ("RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token", "export RAY_AUTH_TOKEN=$(ray get-auth-token --generate)"):
        assert not any(shape.search(line) for shape in SECRET_SHAPES), line


def test_setup_installs_torch_then_the_project(config) -> None:
    assert config["file_mounts"]["~/recolor"] == "."
    commands = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if re.search(r"pip install .*\btorch\b", c))
    project_at = next(i for i, c in enumerate(commands) if re.search(r"pip install .*-e ~/recolor\b", c))
    assert torch_at < project_at
    torch_pin = re.search(r'torch==([\d.]+)"', commands[torch_at]).group(1)
    makefile_pin = re.search(r"TORCH_SPEC \?= torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert torch_pin == makefile_pin, "the cluster and `make install` should train with the same torch"
    assert {".venv", "lake", "mlruns", "mlflow.db", "ray_results"} <= {p.strip("*/") for p in config["rsync_exclude"]}
