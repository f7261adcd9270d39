"""A rerun of a training run, judged against the run before it: which dataset versions it stays on (pinned in the
run's folder), whether a repaired lake still holds them, whether it has anything left to train, and whether it
asks for the samples a step its checkpoint was taken with."""

from __future__ import annotations

import json
import logging

from ingest.errors import ConfigError
from pipeline.config import TrainConfig
from pipeline.data.epochs import rank_batches
from pipeline.data.plan import DataPlan, resolve_config_data

log = logging.getLogger("pipeline.train.driver")


RUN_DATA = ".recolor-data.json"


def pin_run_data(config: TrainConfig, plan: DataPlan, run_uri: str, resuming: bool) -> DataPlan:
    """The data a run trains on: the dataset versions it started with, whatever the lake's latest are now.

    A run's first start records its versions beside its checkpoints (`RUN_DATA`). A resume that names its datasets
    without versions (`--dataset photos`) stays on those versions, with a warning when newer ones exist; one that
    asks for other versions or datasets is refused: its checkpoints, optimizer and epoch position belong to the
    data they were trained on.

    Raises:
        ConfigError: the resume asks for other data, naming what to run instead.
    """
    from ingest.storage import open_storage

    store = open_storage(run_uri)
    recorded = None
    if resuming:
        try:
            recorded = json.loads(store.read_bytes(RUN_DATA))["refs"]
        except FileNotFoundError:
            recorded = None  # a run started before versions were recorded: nothing to compare with
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{store.uri(RUN_DATA)} is damaged: delete it to resume on {', '.join(plan.refs)}"
            ) from None
    if recorded is None or recorded == plan.refs:
        store.write_bytes(RUN_DATA, json.dumps({"refs": plan.refs}).encode())
        return plan
    repaired = repair_continuation(config, recorded, plan.refs)
    if repaired is not None:
        pairs = ", ".join(f"{new} repairs {old}" for old, new in zip(recorded, repaired, strict=True) if old != new)
        log.warning("run %s continues on %s: %s (a lake repair of the versions it began with, the same samples in the "
                    "same shards and order)", config.name, ", ".join(repaired), pairs)  # fmt: skip
        store.write_bytes(RUN_DATA, json.dumps({"refs": repaired}).encode())
        return resolve_config_data(config.data, repaired)
    asked = [name.partition("@") for name in config.data.datasets]
    names = [name for name, _, _ in asked]
    pinned_names = [ref.partition("@")[0] for ref in recorded]
    explicit = [f"{name}@{version}" for name, at, version in asked if at and version != "latest"]
    if names != pinned_names or any(ref not in recorded for ref in explicit):
        new_refs = " ".join(f"--dataset {ref}" for ref in plan.refs)
        raise ConfigError(
            f"run {config.name!r} was trained on {', '.join(recorded)}, and this command asks for "
            f"{', '.join(plan.refs)}: to train on that data start a new run ({new_refs} --name NEW_NAME); to go on "
            f"with this one, pass {' '.join(f'--dataset {ref}' for ref in recorded)}"
        )
    log.warning("run %s resumes on %s, the versions it started with (latest now: %s); to train on the new data "
                "start a new run: --dataset %s --name NEW_NAME", config.name, ", ".join(recorded),
                ", ".join(plan.refs), " --dataset ".join(plan.refs))  # fmt: skip
    return resolve_config_data(config.data, recorded)


def repair_continuation(config: TrainConfig, recorded: list[str], refs: list[str]) -> list[str] | None:
    """The versions a run pinned to `recorded` goes on with when the lake repaired them: for each dataset, the
    newer version `refs` asks for (explicitly or as the latest) when it was made by `recolor lake repair` from the
    pinned one (a chain of repairs) and keeps every sample, so each shard's count and place; else None.

    A run stopped by a damaged shard can then go on after the advised `lake repair`, exactly where it stopped: the
    epoch's read order depends only on the shards' counts and order, which such a repair keeps.

    Raises:
        ConfigError: a repair of the pinned version that dropped samples (the epoch's order cannot go on exactly).
    """
    from ingest.lake import Lake

    if len(recorded) != len(refs) or [r.partition("@")[0] for r in recorded] != [r.partition("@")[0] for r in refs]:
        return None
    lake = Lake(config.data.lake)
    chosen = []
    for old, new in zip(recorded, refs, strict=True):
        if old == new:
            chosen.append(old)
            continue
        name, _, old_version = old.partition("@")
        new_ref = lake.resolve(new)
        record, chain = new_ref.record, [new_ref.version]
        while (record.get("repair") or {}).get("of") is not None and str(record["repair"]["of"]) != old_version:
            record = lake.resolve(f"{name}@{record['repair']['of']}").record
            chain.append(record["version"])
        if str((record.get("repair") or {}).get("of")) != old_version:
            return None  # not a repair of the pinned version: new data
        pinned = lake.resolve(old).record
        if _shard_counts(new_ref.record) != _shard_counts(pinned):
            raise ConfigError(
                f"run {config.name!r} was trained on {old}, and {new} repairs it but dropped samples whose sources "
                f"are gone (`recolor lake show {new}`): the run cannot go on exactly where it stopped. Start a new run "
                f"on the repaired data (--dataset {new} --name NEW_NAME), or restore the sources and repair again"
            )
        chosen.append(new)
    return chosen


def _shard_counts(record: dict) -> dict[str, list[int]]:
    return {split: [entry["count"] for entry in entries] for split, entries in record["shards"].items()}


def trained_all(config: TrainConfig, metrics: dict) -> bool:
    """Whether a run whose latest checkpoint reported `metrics` trained all that `config` asks for."""
    step = metrics.get("global_step")
    if config.max_steps is not None and step is not None and step >= config.max_steps:
        return True
    last_stage = len(config.stages) - 1
    return (
        metrics.get("epoch_end") == 1
        and metrics.get("stage") == last_stage
        and metrics.get("epoch") == config.stages[last_stage].epochs - 1
    )


def check_resumed_batch(config: TrainConfig, metrics: dict) -> None:
    """A resumed run keeps its global batch (the samples of one update, recorded with its checkpoints), whatever
    this command's worker count or batch size: refuse a fixed count that cannot split it evenly, and say when the
    config asks for another batch.

    Raises:
        ConfigError: the fixed worker count does not divide the run's global batch, naming the counts that do.
    """
    from pipeline.config import check_split

    recorded = metrics.get("global_batch")
    if not recorded:
        return  # a checkpoint older than elastic groups: it ran batch_size on each of as many workers
    recorded = int(recorded)
    if not config.elastic:
        check_split(recorded, config.workers, f"run {config.name!r}'s global batch")
    elif recorded < config.max_workers:
        raise ConfigError(f"run {config.name!r} trains {recorded} samples a step, too few for {config.max_workers} "
                          f"workers: cap the group at {recorded} (--workers {config.workers}-{recorded})")  # fmt: skip
    if recorded != config.global_batch:
        shares = "/".join(map(str, sorted(set(rank_batches(recorded, config.workers)), reverse=True)))
        log.warning("run %s resumes with its global batch of %d samples a step (recorded in its checkpoints), not %d: "
                    "%s a worker on %d workers; start a new run (--name) to train with another batch", config.name,
                    recorded, config.global_batch, shares, config.workers)  # fmt: skip
