"""A sweep's trials from --grid axes: order, names, seeded random picks, and the one-line refusals."""

from __future__ import annotations

import pytest

from ingest.errors import ConfigError
from pipeline.sweep.cli import default_name
from pipeline.sweep.space import build_trials, parse_axis


def test_the_grid_is_every_combination_the_last_axis_fastest() -> None:
    trials = build_trials(["stages.0.lr=1e-4,2e-4", "model.norm=batch,instance"])
    assert [trial.override_args() for trial in trials] == [
        ["stages.0.lr=1e-4", "model.norm=batch"],
        ["stages.0.lr=1e-4", "model.norm=instance"],
        ["stages.0.lr=2e-4", "model.norm=batch"],
        ["stages.0.lr=2e-4", "model.norm=instance"],
    ]
    assert [trial.name("s") for trial in trials] == ["s-00", "s-01", "s-02", "s-03"]
    assert trials[1].label() == "lr=1e-4 norm=instance"


def test_a_random_pick_is_the_same_for_the_same_seed_and_never_repeats() -> None:
    axes = ["a=1,2,3,4", "b=x,y,z"]
    first, again, other = build_trials(axes, 5, 1), build_trials(axes, 5, 1), build_trials(axes, 5, 2)
    assert [t.overrides for t in first] == [t.overrides for t in again]
    assert [t.overrides for t in first] != [t.overrides for t in other]
    assert len({t.overrides for t in first}) == 5 and [t.index for t in first] == [0, 1, 2, 3, 4]
    assert len(build_trials(axes, 50, 0)) == 12  # never more than the grid holds


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ([], "at least one --grid"),
        (["lr"], "expected KEY=VALUE"),
        (["lr="], "expected KEY=VALUE"),
        (["lr=1,,2"], "expected KEY=VALUE"),
        (["lr=1,1"], "a value is given twice"),
        (["lr=1,2", "lr=3"], "a key is on two axes (lr)"),
    ],
)
def test_bad_axes_are_refused_naming_them(axes, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_trials(axes)


def test_parse_axis_strips_spaces() -> None:
    assert parse_axis(" model.norm = batch , instance ") == ("model.norm", ["batch", "instance"])


def test_the_default_name_is_the_same_for_the_same_command_only() -> None:
    name = default_name("configs/tiny.yaml", ["a=1,2"], None, 0, [])
    assert name.startswith("tiny-sweep-") and name == default_name("configs/tiny.yaml", ["a=1,2"], None, 0, [])
    assert name != default_name("configs/tiny.yaml", ["a=1,3"], None, 0, [])
    assert name == default_name("configs/tiny.yaml", ["a=1,2"], None, 7, [])  # the seed counts only with --random


def test_a_random_pick_from_a_huge_grid_never_lists_it() -> None:
    axes = [f"k{axis}=" + ",".join(str(value) for value in range(100)) for axis in range(4)]  # 10**8 combinations
    trials = build_trials(axes, 5, 3)
    assert len(trials) == 5 and len({trial.overrides for trial in trials}) == 5
    assert all([key for key, _ in trial.overrides] == ["k0", "k1", "k2", "k3"] for trial in trials)
    with pytest.raises(ConfigError, match="100000000 trials"):
        build_trials(axes)
