"""Credentials for a Ray job, kept out of its runtime environment's plain text.

Ray's runtime env agent logs every runtime environment with its values, and the job API returns
it to any client: a key in `env_vars` ends up in the cluster's logs. So `recolor submit` forwards
endpoints as they are but seals credentials: encrypted (Fernet) under a key derived from the
cluster's auth token, a secret the submitter and every process of the cluster already share,
into one variable, RECOLOR_SEALED_ENV. Each process of the job opens it as it starts: the driver
in `jobs/`, the workers through the runtime env's `worker_process_setup_hook` (this module's
`unseal_environ`). Whoever holds the token can open it; whoever holds the token can already run
code on the cluster.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from ingest.cluster import is_secret_name  # noqa: F401 - part of this module's API: what gets sealed
from ingest.errors import RecolorError

SEALED_ENV = "RECOLOR_SEALED_ENV"
SETUP_HOOK = "pipeline.remote.sealed_env.unseal_environ"


class SealError(RecolorError):
    """Credentials cannot be sealed or opened; the message says which token is missing or wrong."""


def resolve_token(environ=os.environ) -> str | None:
    """The Ray cluster token, looked up as Ray does: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH,
    else ~/.ray/auth_token. None when there is none; SealError when $RAY_AUTH_TOKEN_PATH is unreadable."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    candidate = Path(path).expanduser() if path else Path(environ.get("HOME", "~")).expanduser() / ".ray/auth_token"
    try:
        return candidate.read_text().strip() or None
    except FileNotFoundError:
        if path:  # Ray treats an unreadable explicit path as an error too
            raise SealError(f"RAY_AUTH_TOKEN_PATH={path}: no such file") from None
        return None


def _fernet(token: str):
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"recolor sealed env v1").derive(token.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def seal(values: dict[str, str], token: str) -> str:
    """`values` encrypted and authenticated under a key derived from `token`."""
    return _fernet(token).encrypt(json.dumps(values).encode()).decode()


def unseal(sealed: str, token: str) -> dict[str, str]:
    from cryptography.fernet import InvalidToken

    try:
        return json.loads(_fernet(token).decrypt(sealed.encode()))
    except InvalidToken:
        raise SealError(f"{SEALED_ENV} was sealed with another cluster token") from None


def unseal_environ(environ=os.environ) -> list[str]:
    """Open $RECOLOR_SEALED_ENV into `environ` (the forwarded values win); returns the names set.

    Runs in every process of a submitted job; does nothing outside one.
    """
    sealed = environ.pop(SEALED_ENV, None)
    if not sealed:
        return []
    token = resolve_token(environ)
    if token is None:
        raise SealError(f"{SEALED_ENV} is set but this process has no Ray token to open it")
    values = unseal(sealed, token)
    environ.update(values)
    return sorted(values)
