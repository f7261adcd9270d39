"""Judging a generator: `validation.py` (metric sums over batches), `metrics.py` (the metrics), `fid.py` (FID and
KID on the Inception network), `per_image.py` (the per-image table and the worst images), `promote.py`
(`recolor evaluate`, and the champion gate), `cli.py` (the commands)."""
