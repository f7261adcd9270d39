"""MLflow: `uri.py` (where MLflow is: the embedded default or a server), `runs.py` (a training run's MLflow run:
start, resume, end, find), `loggers.py` (the loop's loggers), `registry.py` (logging, registering and loading
generators), `plots.py` (sample grids, loss curves), `charts.py` (the experiment's chart view: sample grids beside
the metrics)."""
