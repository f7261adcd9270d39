"""Training: `cli.py` (`recolor train`), `driver.py` (plans and runs a Ray Train job), `worker.py` (what each
DDP rank runs), `loop.py` (`ColorizerTrainer`: the recipe's steps, epochs and checkpoints), `checkpoint_store.py`
(a run's checkpoints on Ray Train's storage: upload, resume, repair), `throughput.py` (MFU against the device's
peak, beside the loader's wait), `failures.py` (how a run fails or stops, in one line)."""
