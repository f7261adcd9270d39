"""A sweep's trials: `--grid KEY=V1,V2` axes, their product (or a seeded random subset), one config each.

A trial is its overrides, applied after the preset's and the command's own; its name is the sweep's
name and its index (`mysweep-03`), so the same command always names the same trials, and a rerun
finds each trial's Ray Train run and MLflow run again.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from ingest.errors import ConfigError

MAX_TRIALS = 1000


@dataclass(frozen=True)
class Trial:
    index: int
    overrides: tuple[tuple[str, str], ...]  # (key, value as given), in the order of the --grid axes

    def name(self, sweep: str) -> str:
        return f"{sweep}-{self.index:02d}"

    def override_args(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.overrides]

    def label(self) -> str:
        """`lr=0.0001 norm=batch`: the last part of each key, for tables and charts."""
        return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in self.overrides)


def parse_axis(text: str) -> tuple[str, list[str]]:
    """`stages.0.lr=1e-4,2e-4` -> ("stages.0.lr", ["1e-4", "2e-4"]).

    Raises:
        ConfigError: no `=`, no key, or no value; a value given twice.
    """
    key, sep, values = text.partition("=")
    items = [value.strip() for value in values.split(",")]
    if not sep or not key.strip() or not all(items):
        raise ConfigError(f"--grid {text!r}: expected KEY=VALUE[,VALUE...], e.g. stages.0.lr=1e-4,2e-4")
    if len(set(items)) != len(items):
        raise ConfigError(f"--grid {text!r}: a value is given twice")
    return key.strip(), items


def build_trials(axes: list[str], random_count: int | None = None, seed: int = 0) -> list[Trial]:
    """The grid's trials in order (the last axis varies fastest), or `random_count` of them picked with `seed`.

    Raises:
        ConfigError: no axis, a key on two axes, a bad axis, more than MAX_TRIALS trials, a count below 1.
    """
    if not axes:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2")
    parsed = [parse_axis(axis) for axis in axes]
    keys = [key for key, _ in parsed]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid: a key is on two axes ({', '.join(sorted({k for k in keys if keys.count(k) > 1}))})")
    axes_values = [values for _, values in parsed]
    total = math.prod(len(values) for values in axes_values)
    if random_count is None:
        if total > MAX_TRIALS:
            raise ConfigError(f"the grid has {total} trials (more than {MAX_TRIALS}): use --random N")
        combos = list(itertools.product(*axes_values))
    else:
        if random_count < 1:
            raise ConfigError(f"--random must be at least 1, got {random_count}")
        if random_count > MAX_TRIALS:
            raise ConfigError(f"--random {random_count}: at most {MAX_TRIALS} trials")
        # Picked by index, never listing the whole grid (four axes of 100 values are 10**8 combinations).
        picked = sorted(random.Random(seed).sample(range(total), min(random_count, total)))
        combos = [_combination(index, axes_values) for index in picked]
    return [Trial(index, tuple(zip(keys, combo, strict=True))) for index, combo in enumerate(combos)]


def _combination(index: int, axes_values: list[list[str]]) -> tuple[str, ...]:
    """The `index`-th combination of `itertools.product(*axes_values)`, without listing the others."""
    picked = []
    for values in reversed(axes_values):
        index, position = divmod(index, len(values))
        picked.append(values[position])
    return tuple(reversed(picked))
