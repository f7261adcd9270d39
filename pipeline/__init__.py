"""Training side of the colorization pipeline: models, losses, metrics, data loading and the per-worker loop."""
