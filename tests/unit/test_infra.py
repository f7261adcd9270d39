"""infra/: the compose stack, its env file, the training image and the KubeRay job, checked statically.

Docker and Kubernetes are not available to the tests; these checks hold the files to what the
README promises: the services exist and are wired together, credentials come only from the env
file or a Secret, ports are published on loopback, the job runs `jobs.train` with the same Ray.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
SECRET_NAME = re.compile(r"(?i)(PASSWORD|SECRET|TOKEN|ACCESS_KEY)")
SECRET_SHAPES = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    re.compile(r"(?i)(secret|password|passwd|token)[A-Z_]*\s*[:=]\s*['\"]?(?![$~/'\"\s])[^\s'\"]{8,}"),
]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def as_dict(environment) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.partition("=")[::2] for item in environment)
    return dict(environment or {})


def test_compose_has_the_stack(compose) -> None:
    services = compose["services"]
    assert {"minio", "create-buckets", "postgres", "mlflow", "ray-head"} <= set(services)
    assert services["minio"]["image"].startswith(("quay.io/minio/minio:RELEASE.", "minio/minio:RELEASE."))
    assert services["postgres"]["image"].startswith("postgres:")
    # The bucket step waits for MinIO, creates the pipeline's buckets; MLflow waits for it and PostgreSQL.
    assert services["create-buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(services["create-buckets"]["command"])
    assert re.search(r"mc mb --ignore-existing .*local/lake.*local/mlflow", script)
    mlflow = services["mlflow"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    environment = as_dict(mlflow["environment"])
    assert environment["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert environment["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://mlflow/")
    assert environment["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["command"][:2] == ["mlflow", "server"]
    head = services["ray-head"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--block" in head["command"]
    assert as_dict(head["environment"])["RAY_AUTH_MODE"] == "token"
    assert as_dict(head["environment"])["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_credentials_come_from_the_env_file(compose, env_example) -> None:
    for name, service in compose["services"].items():
        for variable, value in as_dict(service.get("environment")).items():
            if SECRET_NAME.search(variable):
                pytest.fail(f"{name}: {variable} is set in the compose file; it belongs in infra/.env")
            secrets_inside = re.findall(r"\$\{(\w+)", str(value))
            assert all(ref in env_example for ref in secrets_inside), (name, variable)
            if "://" in str(value) and "@" in str(value):  # a URI with credentials: only ${...} in it
                userinfo = str(value).split("://", 1)[1].split("@", 1)[0]
                assert re.fullmatch(r"(\$\{[^}]+\}:?)+", userinfo), (name, variable)
    uses_credentials = ("minio", "create-buckets", "postgres", "mlflow", "ray-head")
    assert all(compose["services"][name]["env_file"] == ".env" for name in uses_credentials)
    text = (INFRA / "docker-compose.yml").read_text()
    for number, line in enumerate(text.splitlines(), 1):
        assert not any(shape.search(line) for shape in SECRET_SHAPES), f"docker-compose.yml:{number}: {line}"


def test_env_example_has_every_variable_and_no_secret(env_example) -> None:
    needed = {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    needed |= {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "RAY_AUTH_TOKEN"}
    assert needed <= set(env_example)
    for name, value in env_example.items():
        if SECRET_NAME.search(name) and name != "AWS_ACCESS_KEY_ID":
            assert value == "change-me", f"{name} in .env.example must be a placeholder"
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "/infra/.env" in ignored, "the real env file must never be committed"


def test_compose_publishes_on_loopback_only(compose) -> None:
    published = [port for service in compose["services"].values() for port in service.get("ports", [])]
    assert published
    assert all(str(port).startswith("127.0.0.1:") for port in published), published
    assert {"127.0.0.1:9000:9000", "127.0.0.1:5000:5000", "127.0.0.1:8265:8265"} <= set(published)


def test_dockerfile_builds_the_training_image() -> None:
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    assert re.match(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime$", base), base
    makefile_pin = re.search(r"TORCH_SPEC \?= torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert base.split(":")[1].startswith(makefile_pin + "-"), "the image should carry the torch the Makefile pins"
    assert "FROM ${BASE_IMAGE}" in text and "WORKDIR /opt/recolor" in text
    # Every package pyproject.toml installs (the image's `pip install -e .` and the import check need them all).
    packages = re.findall(r'"(\w+)\*"', re.search(r"include = \[(.*)\]", (REPO / "pyproject.toml").read_text())[1])
    assert {"pipeline", "ingest", "jobs", "infra"} <= set(packages)
    for folder in (*packages, "configs"):
        assert re.search(rf"^COPY {folder} {folder}$", text, re.MULTILINE), folder
    assert re.search(r"pip install --no-deps -e \.", text) and "psycopg2" in text  # MLflow's PostgreSQL driver
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE)


def test_rayjob_runs_jobs_train_with_token_auth() -> None:
    text = (INFRA / "kuberay-rayjob.yaml").read_text()
    manifest = yaml.safe_load(text)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:3] == ["python", "-m", "jobs.train"]
    config = entrypoint[3]
    assert config.startswith("/opt/recolor/") and (REPO / config.removeprefix("/opt/recolor/")).is_file()
    assert "--gpu" in entrypoint
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    containers = [c for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        containers += group["template"]["spec"]["containers"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if "nvidia.com/gpu" in str(g["template"])]
    assert gpu_groups
    for container in containers:
        literal = [e["name"] for e in container.get("env", []) if SECRET_NAME.search(e["name"]) and "value" in e]
        assert not literal, f"{container['name']}: {literal} should come from a Secret"
        assert {"secretRef": {"name": "recolor-endpoints"}} in container["envFrom"]
    for number, line in enumerate(text.splitlines(), 1):
        assert not any(shape.search(line) for shape in SECRET_SHAPES), f"kuberay-rayjob.yaml:{number}: {line}"


def test_readme_explains_the_infra() -> None:
    text = (INFRA / "README.md").read_text()
    for needle in ("docker compose", ".env.example", "infra/Dockerfile", "kuberay-rayjob.yaml", "--no-forward-env"):
        assert needle in text, needle
