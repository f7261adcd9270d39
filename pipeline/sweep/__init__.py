"""`recolor sweep`: trials of one preset (`space`), run by Ray Tune over Ray Train (`driver`), ranked in MLflow
(`ranking`); `cli` has its options."""
