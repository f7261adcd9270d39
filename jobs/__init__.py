"""Thin Ray job entrypoints (`python -m jobs.ingest|train|evaluate|sweep|colorize ARGS`: `ingest.py`, `train.py`,
`evaluate.py`, `sweep.py`, `colorize.py`), submitted by `recolor submit`; `common.py` is what each does around
the CLI call (its credentials, where it reads and writes)."""
