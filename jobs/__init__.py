"""Thin Ray job entrypoints (`python -m jobs.ingest|train|evaluate ARGS`), submitted by `recolor submit`."""
