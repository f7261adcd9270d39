"""The trainer's one face onto the read path: a rank's batches of any epoch from any step, and the state an epoch
resumed mid-way needs to read on exactly as it began.

A rank's read stream is fixed by the data plan, the seed, the epoch key and this state: how many shards are read at
a time (`interleave`), the samples a shuffle window holds (`window`), the samples a step over all ranks
(`global_batch`), the epoch's worker groups so far (`splits`: [(workers, first step), ...], an elastic group's
re-splits) and whether ranks read the shards they own (`owned`). The config gives them for a fresh epoch; a
checkpoint taken mid-epoch gives them for the rest of that epoch, whatever the config says now (the new settings
apply from the next epoch, and a warning says so). The trainer and the checkpoint carry the state as an opaque,
versioned dict (`EpochReader.state_dict`, `load_state_dict`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.data.batches import LoaderOptions, train_batches
from pipeline.data.epochs import rank_batches
from pipeline.data.plan import DataPlan

log = logging.getLogger(__name__)

STATE_VERSION = 1
STAGE_EPOCHS = 100_000  # epoch keys: stage * STAGE_EPOCHS + epoch, so every stage's epochs shuffle differently


def epoch_key(stage: int, epoch: int) -> int:
    """The number an epoch's shuffles, flips and windows derive from (with the seed)."""
    return stage * STAGE_EPOCHS + epoch


@dataclass
class ReadState:
    """How the epoch in progress is read (see the module)."""

    interleave: int
    global_batch: int  # 0: not recorded (checkpoints older than elastic groups): the config's
    splits: list[tuple[int, int]] = field(default_factory=list)  # []: not recorded, this group's from step 0
    owned: bool = False
    window: int = 0  # samples a shuffle window holds; 0: not recorded (format-1 checkpoints): the config's

    def to_dict(self) -> dict:
        return {"version": STATE_VERSION, "interleave": self.interleave, "global_batch": self.global_batch,
                "splits": [list(split) for split in self.splits], "owned": self.owned,
                "window": self.window}  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict) -> ReadState:
        if values.get("version") != STATE_VERSION:
            raise ValueError(f"read state version {values.get('version')!r}: this recolor reads {STATE_VERSION}")
        splits = [(int(workers), int(step)) for workers, step in values["splits"]]
        return cls(int(values["interleave"]), int(values["global_batch"]), splits, bool(values["owned"]),
                   int(values.get("window", 0)))  # fmt: skip


def owns_shards(config: TrainConfig, plan: DataPlan) -> bool:
    """Whether each rank reads the shards it owns every epoch (`data.shard_ownership`; "auto": where the shard cache
    is configured). Decided by the config and the lake alone, never by whether the cache could be opened: the
    epoch's order must be the same when it resumes."""
    mode = config.data.shard_ownership
    if mode != "auto":
        return mode == "on"
    return config.data.cache == "on" or (config.data.cache == "auto" and any(s.uri.startswith("s3://")
                                                                              for s in plan.train))  # fmt: skip


def shard_cache_for(config: TrainConfig, plan: DataPlan):
    """The node's shard cache this worker reads through (`pipeline.data.shard_cache`), or None (`data.cache`: "auto"
    uses one for s3:// lakes only: local shards are read from disk anyway)."""
    from pipeline.data.shard_cache import default_cache_dir, node_cache

    mode = config.data.cache
    if mode == "off" or (mode == "auto" and not any(s.uri.startswith("s3://") for s in plan.train)):
        return None
    root = config.data.cache_dir or default_cache_dir()
    capacity = config.data.cache_bytes
    if capacity is None:
        import shutil

        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            capacity = int(0.8 * shutil.disk_usage(root).free)
        except OSError as e:
            log.warning("the shard cache %s cannot be used (%s): streaming shards from the store", root, e)
            return None
    return node_cache(root, capacity)


class EpochReader:
    """One rank's reader of a run's epochs: `batches(stage, epoch, start_step)`, and the read state the checkpoint
    keeps (`state_dict`) and a resumed run gives back (`load_state_dict`) before its first epoch."""

    def __init__(self, config: TrainConfig, plan: DataPlan, rank: int, world_size: int):
        self.config, self.plan, self.rank, self.world_size = config, plan, rank, world_size
        self.cache = shard_cache_for(config, plan)
        # The run's samples a step, whatever the number of workers: a resume on another count keeps it (the rate
        # means the same), and each rank takes its share (`rank_batches`).
        global_batch = config.global_batch if config.elastic else config.data.batch_size * world_size
        self.state = ReadState(config.data.interleave, global_batch, [(world_size, 0)], owns_shards(config, plan),
                               config.data.shuffle_window)  # fmt: skip
        self._resumed: ReadState | None = None  # the checkpoint's, for the rest of the epoch it was taken in

    @property
    def global_batch(self) -> int:
        return self.state.global_batch

    def load_state_dict(self, values: dict) -> None:
        """The read state of the checkpoint the run resumes from."""
        self._resumed = ReadState.from_dict(values)
        self.state.global_batch = self._resumed.global_batch or self.state.global_batch

    def state_dict(self, mid_epoch: bool) -> dict:
        """The read state for a checkpoint: the epoch's worker groups so far when it is taken mid-epoch."""
        splits = self.state.splits if mid_epoch else [(self.world_size, 0)]
        state = self.state
        return ReadState(state.interleave, state.global_batch, splits, state.owned, state.window).to_dict()

    def resized_from(self) -> int | None:
        """The size of the worker group that took the checkpoint this group resumes from, when it differs."""
        before = self._resumed.splits[-1][0] if self._resumed and self._resumed.splits else None
        return before if before is not None and before != self.world_size else None

    def resize_note(self, position) -> str:
        """What a resized group says when it starts (an event of the run)."""
        shares = sorted(set(rank_batches(self.global_batch, self.world_size)), reverse=True)
        return (f"worker group resized {self.resized_from()} -> {self.world_size} (stage {position.stage}, epoch "
                f"{position.epoch}, step {position.step_in_epoch} of the epoch); {self.global_batch} samples a step, "
                f"{'/'.join(map(str, shares))} a worker")  # fmt: skip

    def batches(self, stage: int, epoch: int, start_step: int):
        """This rank's batches of an epoch from `start_step` (`pipeline.data.batches.train_batches`), read as the
        epoch began: (batches, the epoch's steps, the corrupt-sample counter)."""
        config, resumed = self.config, self._resumed if start_step else None
        self._resumed = None
        interleave, owned, window = config.data.interleave, owns_shards(config, self.plan), config.data.shuffle_window
        if resumed is not None and resumed.interleave != interleave:
            log.warning("finishing this epoch reading %d shard(s) at a time, as it began; data.interleave=%d from "
                        "the next", resumed.interleave, interleave)  # fmt: skip
            interleave = resumed.interleave
        if resumed is not None and resumed.owned != owned:
            log.warning("finishing this epoch with shard ownership %s, as it began; %s from the next",
                        "on" if resumed.owned else "off", "on" if owned else "off")  # fmt: skip
            owned = resumed.owned
        if resumed is not None and resumed.window and resumed.window != window:
            log.warning("finishing this epoch with shuffle windows of %d samples, as it began; data.shuffle_window=%d "
                        "from the next", resumed.window, window)  # fmt: skip
            window = resumed.window
        splits = [(self.world_size, 0)]
        if resumed is not None and resumed.splits:  # its groups, and this one from `start_step` when it differs
            splits = (
                resumed.splits
                if resumed.splits[-1][0] == self.world_size
                else [*resumed.splits, (self.world_size, start_step)]
            )
        self.state = ReadState(interleave, self.state.global_batch, splits, owned, window)
        options = LoaderOptions(
            global_batch=self.state.global_batch,
            shuffle_window=window,
            flip=config.data.flip,
            rotate=config.data.rotate_degrees,
            interleave=interleave,
            loader_workers=config.data.loader_workers or config.cpus_per_worker,
            loader_processes=config.data.loader_processes,
            max_bad_fraction=config.data.max_bad_fraction,
            owned_shards=owned,
        )
        return train_batches(self.plan, epoch_key(stage, epoch), config.seed, self.rank, self.world_size, options,
                             start_step, splits, cache=self.cache)  # fmt: skip
