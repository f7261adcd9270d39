"""The project's one error base: every error a user can act on is a `RecolorError` whose message says what to do.

`pipeline.cli` maps them to exit codes in one table (`exit_code_and_message` there): 2 for what the user must change
(a setting, an input, a missing dataset, credentials), 1 for a training run that failed in its workers.
Anything else that escapes is a bug and keeps its traceback. Here, in `ingest`, because `ingest` never
imports `pipeline` and both raise them.
"""

from __future__ import annotations


class RecolorError(RuntimeError):
    """An error the user can act on; the message names the object and what to do."""


class ConfigError(RecolorError, ValueError):
    """A setting, option, variable or input file is wrong (a ValueError too, for callers that catch those)."""


def one_line(error: BaseException) -> str:
    """An error in one line of at most 300 characters, credentials masked (boto3's errors name the endpoint's URL,
    password included). A `ValueError`'s message is shown alone: the project's refusals say what they are; anything
    else is prefixed with its type's name, which is often all a low-level error says (`ConnectionResetError: `)."""
    from ingest.cluster import mask_secrets

    text = " ".join(str(error).split())
    shown = text if isinstance(error, ValueError) and text else f"{type(error).__name__}: {text}".rstrip(": ")
    return mask_secrets(shown)[:300]
