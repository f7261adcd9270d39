"""Ingest: sources to versioned lake datasets of Lab WebDataset shards (README, Layout). Never imports `pipeline`."""
