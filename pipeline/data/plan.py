"""A run's data: the dataset versions it trains on, pinned once on the driver, and their shards (`DataPlan`).

What each rank reads of them, epoch by epoch, is `pipeline.data.epochs`'s; reading it is `pipeline.data.batches`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ingest.errors import RecolorError
from ingest.images import DEFAULT_RESIZE


class DataError(RecolorError):
    """The training data cannot be used as configured (too many corrupt samples, empty split, ...)."""


@dataclass(frozen=True)
class ShardInfo:
    uri: str
    count: int
    size: int | None = None  # bytes, as the version records (what a cached copy must have); None: unknown
    source: int = 0  # which of the plan's datasets (an index into `DataPlan.refs`)
    sha256: str | None = None  # of the shard's bytes, as the version records (None: a lake from before digests)


@dataclass
class DataPlan:
    """The pinned dataset versions of a run and their shards, resolved once on the driver."""

    refs: list[str]  # "name@version"
    digests: dict[str, str]  # ref -> manifest SHA-256
    uris: dict[str, str]  # ref -> URI of the version record
    size: int  # sample side in pixels
    train: list[ShardInfo] = field(default_factory=list)
    resize: str = DEFAULT_RESIZE  # how ingest fit photos to the side ("cover": short side, centre crop; "squash")
    val: list[ShardInfo] = field(default_factory=list)
    weights: list[float] | None = None  # a mixture: each dataset's share of an epoch (by `refs`); None: all, once
    epoch_samples: int | None = None  # a mixture's epoch length (None: the datasets' training samples)

    def to_dict(self) -> dict:
        return {
            "refs": self.refs,
            "digests": self.digests,
            "uris": self.uris,
            "size": self.size,
            "resize": self.resize,
            "train": [[s.uri, s.count, s.size, s.source, s.sha256] for s in self.train],
            "val": [[s.uri, s.count, s.size, s.source, s.sha256] for s in self.val],
            "weights": self.weights,
            "epoch_samples": self.epoch_samples,
        }

    @classmethod
    def from_dict(cls, values: dict) -> DataPlan:
        return cls(
            refs=list(values["refs"]),
            digests=dict(values["digests"]),
            uris=dict(values["uris"]),
            size=int(values["size"]),
            resize=str(values.get("resize", DEFAULT_RESIZE)),
            train=[_shard_info(*shard) for shard in values["train"]],
            val=[_shard_info(*shard) for shard in values["val"]],
            weights=values.get("weights"),
            epoch_samples=values.get("epoch_samples"),
        )

    def count(self, split: str) -> int:
        return sum(s.count for s in (self.train if split == "train" else self.val))

    def epoch_length(self) -> int:
        """Training samples an epoch draws: a mixture's `epoch_samples`, else every training sample once."""
        return self.epoch_samples or self.count("train")

    def source(self, index: int) -> DataPlan:
        """The plan of one of its datasets alone (`refs[index]`): per-dataset validation."""
        ref = self.refs[index]
        return DataPlan(refs=[ref], digests={ref: self.digests.get(ref, "")}, uris={ref: self.uris.get(ref, "")},
                        size=self.size, resize=self.resize, train=[s for s in self.train if s.source == index],
                        val=[s for s in self.val if s.source == index])  # fmt: skip


def _shard_info(uri: str, count: int, size: int | None = None, source: int = 0, sha256: str | None = None) -> ShardInfo:
    return ShardInfo(uri, int(count), None if size is None else int(size), int(source), sha256)


def resolve_data(datasets: list[str], lake_uri: str | None, weights: list[float] | None = None,
                 epoch_samples: int | None = None) -> DataPlan:  # fmt: skip
    """Pin `NAME[@VERSION]` references to versions and list their shards (grayscale-free by construction); with
    `weights` (one a dataset), the plan of a mixture (`epoch_segments`).

    Raises:
        LakeError: an unknown dataset or version; DataError: no datasets, or mixed sample sizes.
    """
    from ingest.lake import Lake

    if not datasets:
        raise DataError("no training data: pass --dataset NAME[@VERSION] (or set data.datasets in the config)")
    lake = Lake(lake_uri)
    lake.check()
    plan = DataPlan(refs=[], digests={}, uris={}, size=0)
    for name in datasets:
        ref = lake.resolve(name)
        size = int(ref.record["size"])
        if plan.size and size != plan.size:
            raise DataError(f"{ref.ref} holds {size}px samples but {plan.refs[0]} holds {plan.size}px: mix one size")
        plan.size = size
        plan.resize = str(ref.record.get("resize", DEFAULT_RESIZE))
        plan.refs.append(ref.ref)
        plan.digests[ref.ref] = ref.record["manifest_sha256"]
        plan.uris[ref.ref] = lake.storage.uri(f"{ref.dataset}/versions/{ref.version:06d}.json")
        source = len(plan.refs) - 1
        for split, shards in (("train", plan.train), ("val", plan.val)):
            shards += [ShardInfo(s["uri"], int(s["count"]), int(s["bytes"]), source, s.get("sha256"))
                       for s in lake.shards(ref, split)]  # fmt: skip
    if weights is not None:
        if len(plan.refs) != len(set(plan.refs)):
            raise DataError(f"a mixture names one dataset version twice ({', '.join(plan.refs)}): give it one weight")
        empty = [ref for index, ref in enumerate(plan.refs) if not any(s.source == index for s in plan.train)]
        if empty:
            raise DataError(f"{', '.join(empty)} has no training samples to draw its share of the mixture from")
        plan.weights = [float(w) for w in weights]
        plan.epoch_samples = epoch_samples
    return plan


def resolve_config_data(data, datasets: list[str] | None = None) -> DataPlan:
    """The plan of a run's `DataConfig` (`pipeline.config`): its datasets, and with `data.mix` their weights.
    `datasets` replaces the names with pinned versions (a resumed run's), in the same order."""
    weights = list(data.mix.values()) if data.mix else None
    return resolve_data(datasets or data.datasets, data.lake, weights, data.epoch_samples)
