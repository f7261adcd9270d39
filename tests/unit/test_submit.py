"""`recolor submit` / `recolor jobs` without a cluster: address and token lookup, what a job is sent, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import types
from pathlib import Path

import pytest
from ray._private.runtime_env.packaging import _get_excludes

from pipeline.cli import main
from pipeline.remote import sealed_env, submit

REPO = Path(__file__).resolve().parents[2]


class FakeClient:
    """Stands in for `JobSubmissionClient`: records the submission, replays logs, reports `final`."""

    def __init__(self, final: str = "SUCCEEDED", logs: str = "listed 3, ingested 3\n"):
        self.final, self.logs = final, logs
        self.submitted: dict = {}

    def submit_job(self, **kwargs) -> str:
        self.submitted = kwargs
        return kwargs.get("submission_id") or "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        yield self.logs

    def get_job_status(self, job_id) -> str:
        return self.final

    def get_job_info(self, job_id):
        message = None if self.final == "SUCCEEDED" else "Job entrypoint command failed with exit code 2"
        return types.SimpleNamespace(status=self.final, message=message)


@pytest.fixture
def fake_cluster(monkeypatch):
    """Replace the job server with a `FakeClient`; returns it (set `.final` before submitting)."""
    client = FakeClient()
    seen = {}

    @contextlib.contextmanager
    def fake_job_client(address=None):
        seen["address"] = submit.resolve_address(address)
        yield client

    monkeypatch.setattr(submit, "job_client", fake_job_client)
    client.seen = seen
    return client


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    for name in [name for name in os.environ if name.startswith("RECOLOR_")]:  # forwarded: e.g. a test-run's own
        monkeypatch.delenv(name)  # RECOLOR_TEST_CPU_LOG would be one more forwarded variable
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_address_precedence(clean_env) -> None:
    assert submit.resolve_address() == "http://127.0.0.1:8265"
    clean_env.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is not a job server
    assert submit.resolve_address() == "http://127.0.0.1:8265"
    clean_env.setenv("RAY_ADDRESS", "http://head:8265")
    assert submit.resolve_address() == "http://head:8265"
    clean_env.setenv("RAY_DASHBOARD_ADDRESS", "http://dash:8265")
    assert submit.resolve_address() == "http://dash:8265"
    clean_env.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert submit.resolve_address() == "http://api:8265"
    assert submit.resolve_address("http://given:1") == "http://given:1"


def test_token_lookup_follows_ray(clean_env, tmp_path) -> None:
    assert submit.resolve_token() is None
    home_token = tmp_path / "home" / ".ray" / "auth_token"
    home_token.parent.mkdir(parents=True)
    home_token.write_text("from-home\n")
    assert submit.resolve_token() == "from-home"
    token_file = tmp_path / "token"
    token_file.write_text("from-path\n")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert submit.resolve_token() == "from-path"
    clean_env.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.resolve_token() == "from-env"
    clean_env.delenv("RAY_AUTH_TOKEN")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(submit.SubmitError, match="RAY_AUTH_TOKEN_PATH=.*no such file"):
        submit.resolve_token()


def test_forwarded_variables() -> None:
    environ = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_PROFILE": "laptop-profile",
        "AWS_CA_BUNDLE": "/home/me/ca.pem",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "RECOLOR_LAKE": "s3://lake/lake",
        "RECOLOR_STACK_ID": "abc",
        "RAY_AUTH_TOKEN": "never-forwarded",
        "HOME": "/home/me",
        "HF_TOKEN": "x",
    }
    assert submit.forwarded_env(environ) == {
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "RECOLOR_LAKE": "s3://lake/lake",
    }
    assert submit.forwarded_env(environ, extra=["HF_TOKEN", "NOT_SET"])["HF_TOKEN"] == "x"
    # A submitter's own checksum choice travels; none is added (every S3 client of the project sets its default).
    chosen = submit.forwarded_env(environ | {"AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_SUPPORTED"})
    assert chosen["AWS_REQUEST_CHECKSUM_CALCULATION"] == "WHEN_SUPPORTED"


def test_working_dir_ships_code_not_data() -> None:
    runtime_env = submit.build_runtime_env(REPO, {"A": "1"})
    assert runtime_env["working_dir"] == str(REPO) and runtime_env["env_vars"] == {"A": "1"}
    excluded = _get_excludes(REPO, runtime_env["excludes"])  # Ray's own matcher, as used when it packages
    for path in (".venv/bin/python", "lake/photos/versions/000001.json", "mlflow.db", "mlruns/0/meta.yaml"):
        assert excluded(REPO / path), path
    for path in (".git/HEAD", "ray_results/run/x", "recolor.egg-info/PKG-INFO", "pipeline/__pycache__/cli.pyc"):
        assert excluded(REPO / path), path
    for path in ("jobs/train.py", "ingest/lake.py", "pipeline/cli.py", "configs/tiny.yaml", "pyproject.toml"):
        assert not excluded(REPO / path), path


def test_working_dir_must_be_the_project(tmp_path) -> None:
    with pytest.raises(submit.SubmitError, match="not the project root"):
        submit.build_runtime_env(tmp_path, {})


def test_submit_runs_the_job_module_with_options_anywhere(fake_cluster, clean_env, capsys) -> None:
    clean_env.setenv("RAY_AUTH_TOKEN", "cluster-token")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    args = ["submit", "--no-follow", "ingest", "folder", "s3://b/photos", "--dataset", "photos", "--lake", "s3://l"]
    code = main([*args, "--address", "http://head:8265", "--submission-id", "job-1"])
    out, err = capsys.readouterr()
    assert code == 0
    assert fake_cluster.seen["address"] == "http://head:8265"
    sent = fake_cluster.submitted
    assert sent["entrypoint"] == "python -m jobs.ingest folder s3://b/photos --dataset photos --lake s3://l"
    assert sent["submission_id"] == "job-1"
    assert out.splitlines() == ["job-1"]
    assert "forwarded variables: MLFLOW_TRACKING_URI" in err
    assert "sealed with the cluster token: AWS_SECRET_ACCESS_KEY" in err
    assert "s3cr3t-value" not in out + err and "mlflow.internal" not in out + err


def test_credentials_travel_sealed(fake_cluster, clean_env) -> None:
    clean_env.setenv("RAY_AUTH_TOKEN", "cluster-token")
    clean_env.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "recolor")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert main(["submit", "--no-follow", "train", "configs/tiny.yaml"]) == 0
    runtime_env = fake_cluster.submitted["runtime_env"]
    # Ray logs runtime environments: nothing secret may be readable in one.
    assert "s3cr3t-value" not in json.dumps(runtime_env)
    env_vars = runtime_env["env_vars"]
    assert env_vars["AWS_ENDPOINT_URL"] == "http://minio:9000" and "AWS_SECRET_ACCESS_KEY" not in env_vars
    assert sealed_env.unseal(env_vars[sealed_env.SEALED_ENV], "cluster-token") == {
        "AWS_ACCESS_KEY_ID": "recolor",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
    }
    assert runtime_env["worker_process_setup_hook"] == "pipeline.remote.sealed_env.unseal_environ"


def test_without_a_token_credentials_stay_home(fake_cluster, clean_env, capsys) -> None:
    clean_env.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert main(["submit", "--no-follow", "train", "configs/tiny.yaml"]) == 0
    runtime_env = fake_cluster.submitted["runtime_env"]
    assert runtime_env["env_vars"] == {"AWS_ENDPOINT_URL": "http://minio:9000"}
    assert "worker_process_setup_hook" not in runtime_env
    assert "not forwarded (no cluster token to seal them with): AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err


def test_submit_quotes_arguments(fake_cluster, clean_env) -> None:
    assert main(["submit", "train", "configs/tiny.yaml", "name=my run", "--no-follow"]) == 0
    assert fake_cluster.submitted["entrypoint"] == "python -m jobs.train configs/tiny.yaml 'name=my run'"


def test_no_forward_env(fake_cluster, clean_env) -> None:
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert main(["submit", "--no-forward-env", "--no-follow", "train", "configs/tiny.yaml"]) == 0
    assert fake_cluster.submitted["runtime_env"]["env_vars"] == {}


@pytest.mark.parametrize(("final", "code"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_follows_logs_and_exits_with_the_job_status(fake_cluster, clean_env, capsys, final, code) -> None:
    fake_cluster.final = final
    assert main(["submit", "evaluate", "--model", "models:/colorizer/1", "--dataset", "photos", "--promote"]) == code
    out, err = capsys.readouterr()
    assert fake_cluster.submitted["entrypoint"].startswith("python -m jobs.evaluate --model models:/colorizer/1")
    assert out.splitlines() == ["raysubmit_fake", "listed 3, ingested 3"]
    assert f"job raysubmit_fake {final}" in err
    assert ("exit code 2" in err) == (final != "SUCCEEDED")


def test_unreachable_job_server(clean_env, capsys) -> None:
    from infra.stack.s3_server import free_port

    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "no Ray job server at http://127.0.0.1:" in capsys.readouterr().err


def test_a_refused_submission_is_one_error_line(fake_cluster, clean_env, capsys) -> None:
    def refuse(**kwargs):
        raise RuntimeError("Request failed with status code 500: No available agent to submit job.")

    fake_cluster.submit_job = refuse
    assert main(["submit", "train", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["recolor: error: Request failed with status code 500: No available agent to submit job."]


def test_a_tracking_uri_with_a_password_travels_sealed_and_is_never_printed(fake_cluster, clean_env, capsys) -> None:
    clean_env.setenv("RAY_AUTH_TOKEN", "cluster-token")
    clean_env.setenv("MLFLOW_TRACKING_URI", "https://ann:hunter2@mlflow.example:5000")
    clean_env.setenv("RECOLOR_LAKE", "s3://lake/lake?X-Amz-Signature=abc123def")
    assert main(["submit", "--no-follow", "train", "configs/tiny.yaml"]) == 0
    env_vars = fake_cluster.submitted["runtime_env"]["env_vars"]
    assert "MLFLOW_TRACKING_URI" not in env_vars and "RECOLOR_LAKE" not in env_vars
    assert sealed_env.unseal(env_vars[sealed_env.SEALED_ENV], "cluster-token")["MLFLOW_TRACKING_URI"].endswith(
        "hunter2@mlflow.example:5000"
    )
    out = capsys.readouterr()
    assert "sealed with the cluster token: MLFLOW_TRACKING_URI, RECOLOR_LAKE" in out.err
    assert "hunter2" not in out.out + out.err and "abc123def" not in out.out + out.err
    assert "hunter2" not in json.dumps(fake_cluster.submitted)


def test_printed_lines_mask_passwords_in_urls_and_tokens_in_query_strings(monkeypatch, capsys) -> None:
    from ingest.cluster import mask_secrets
    from jobs.common import start_job

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-pass")
    assert mask_secrets("at https://ann:hunter2@mlflow:5000/x?token=t0k3n&page=2 with s3cr3t-pass") == (
        "at https://ann:***@mlflow:5000/x?token=***&page=2 with ***"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ann:hunter2@mlflow:5000")
    start_job("train")
    printed = capsys.readouterr().out
    assert "MLFLOW_TRACKING_URI=https://ann:***@mlflow:5000" in printed and "hunter2" not in printed
