"""The pattern of dataset names (and of run names, `pipeline.config`): its one owner, light enough for any import."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
