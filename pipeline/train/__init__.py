"""Training: `cli.py` (`recolor train`), `driver.py` (plans and runs a Ray Train job), `worker.py` (what each
DDP rank runs), `loop.py` (`ColorizerTrainer`: the recipe's steps, epochs and checkpoints), `failures.py` (how a
run fails or stops, in one line)."""
