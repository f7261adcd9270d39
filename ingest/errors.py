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
