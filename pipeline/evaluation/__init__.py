"""Judging and using a generator: `validation.py` (metric sums over batches), `metrics.py` (the metrics),
`promote.py` (`recolor evaluate`), `colorize.py` (`recolor colorize`), `cli.py` (their commands)."""
