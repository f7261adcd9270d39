"""Ingest: sources to versioned lake datasets of Lab WebDataset shards (see README, Layout). Never imports `pipeline`."""
