"""A registered generator outside training: the MLflow serving model (`pyfunc`, its signature and defaults in
`signature`) and exports (`export`, `recolor export` in `cli`)."""

# `recolor export`'s choices, here because this package imports no torch: every `recolor` command builds the parser.
EXPORT_FORMATS = ("onnx", "pt2", "mlflow")  # mlflow: a model folder recolor wrote afresh, for `mlflow models serve`
TOLERANCE = 1e-4  # max abs difference on the ab output, in the network's [-1, 1] units
