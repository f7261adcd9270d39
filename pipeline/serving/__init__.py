"""A registered generator outside training: the MLflow serving model (`pyfunc`) and exports (`export`)."""
