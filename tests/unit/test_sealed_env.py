"""Sealed credentials: only the cluster token opens them, and every job process opens them at start."""

from __future__ import annotations

import pytest

from pipeline.remote.sealed_env import SEALED_ENV, SealError, is_secret_name, seal, unseal, unseal_environ


def test_round_trip_and_wrong_token() -> None:
    values = {"AWS_ACCESS_KEY_ID": "recolor", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    sealed = seal(values, "token-a")
    assert "s3cr3t" not in sealed and "recolor" not in sealed
    assert unseal(sealed, "token-a") == values
    with pytest.raises(SealError, match="another cluster token"):
        unseal(sealed, "token-b")
    with pytest.raises(SealError):
        unseal(sealed[:-4] + "AAAA", "token-a")  # tampered


def test_unseal_environ_opens_into_the_environment(tmp_path) -> None:
    token_file = tmp_path / "auth_token"
    token_file.write_text("cluster-token\n")
    environ = {
        SEALED_ENV: seal({"AWS_SECRET_ACCESS_KEY": "s3cr3t"}, "cluster-token"),
        "RAY_AUTH_TOKEN_PATH": str(token_file),  # as Ray's workers inherit it from the raylet
        "AWS_SECRET_ACCESS_KEY": "the-node's-own",
    }
    assert unseal_environ(environ) == ["AWS_SECRET_ACCESS_KEY"]
    assert environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and SEALED_ENV not in environ


def test_unseal_environ_outside_a_job_does_nothing() -> None:
    environ = {"PATH": "/bin"}
    assert unseal_environ(environ) == [] and environ == {"PATH": "/bin"}


def test_unseal_environ_without_a_token_is_an_error(tmp_path) -> None:
    environ = {SEALED_ENV: seal({"A_TOKEN": "x"}, "t"), "HOME": str(tmp_path)}
    with pytest.raises(SealError, match="no Ray token"):
        unseal_environ(environ)


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("AWS_SECRET_ACCESS_KEY", True),
        ("AWS_ACCESS_KEY_ID", True),
        ("AWS_SESSION_TOKEN", True),
        ("MLFLOW_TRACKING_PASSWORD", True),
        ("MLFLOW_TRACKING_TOKEN", True),
        ("AWS_ENDPOINT_URL", False),
        ("MLFLOW_TRACKING_URI", False),
        ("RECOLOR_LAKE", False),
        ("AWS_REQUEST_CHECKSUM_CALCULATION", False),
    ],
)
def test_secret_names(name, secret) -> None:
    assert is_secret_name(name) is secret
