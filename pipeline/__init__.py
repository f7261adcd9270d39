"""Training, evaluation and tracking of colorizers: models, losses, data, the Ray Train driver and workers, MLflow
(README, Layout)."""
