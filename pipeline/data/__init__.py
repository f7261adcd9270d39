"""The training read path: which samples each rank reads, in what order, from where, and the batches they make.

`plan.py` (a run's pinned dataset versions and their shards: `DataPlan`), `epochs.py` (which samples each rank trains,
in what order: exact epochs on any worker count, re-split when a group resizes; mixtures), `reading.py` (shards to
samples: tar, CRC-32, views of mapped files; shuffle windows filled in one pass; blocks reused once no batch holds
them), `batches.py` (a rank's epoch as batches: windows cut into batches, corrupt-sample counts, the reading threads),
`loader_processes.py` (data.loader_workers > 1: processes that fill each window together, each from its own shards),
`shard_cache.py` (the node-local cache of s3:// shards that all ranks of a node share), and `reader.py`: the
trainer's one face onto all of it (`EpochReader`: a rank's batches of any epoch from any step, and the versioned read
state a checkpoint carries so that a resumed epoch reads on exactly as it began).

Importing this package imports none of them: `plan` is read by light commands (`recolor lake`, the CLI's checks).
"""
