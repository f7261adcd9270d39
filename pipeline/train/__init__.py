"""Training: `cli.py` (`recolor train`), `driver.py` (plans a Ray Train job and sees it through), `trainer.py`
(Ray Train's trainer as recolor runs it: the worker group, the run storage, `fit` until done or stopped), `worker.py`
(what each DDP rank runs), `loop.py` (`ColorizerTrainer`: the recipe's steps, epochs and checkpoints),
`checkpoint_store.py` (a run's checkpoints on Ray Train's storage: upload, resume, repair), `rerun.py` (a rerun
judged against the run before it: its pinned data, its samples a step), `ranks.py` (what a rank does with the others:
sums, validation with FID, the test hooks), `throughput.py` (MFU against the device's peak, beside the loader's
wait), `progress.py` (the progress bar), `failures.py` (how a run fails or stops, in one line)."""
