"""`bench/gpu.py --dry-run`: the GPU figures script runs every part on the CPU, so it is ready when a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_script_runs_every_part_in_a_dry_run(tmp_path, ray_address) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "RAY_ADDRESS": ray_address}  # its `recolor train` joins the session's Ray, as on a cluster
    done = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    results = json.loads(out.read_text())
    for part in ("step_batch2", "step_batch4", "feed", "train", "quality", "colorize"):
        assert part in results and "error" not in results[part], (part, results.get(part))
    assert results["step_batch2"]["project_img_s"] > 0 and results["colorize"]["images"] == 4
    assert results["train"]["global_step"] > 0 and results["feed"]["cores_to_feed_the_step"] > 0
    assert "| step_batch2 |" in done.stdout  # the markdown table for bench/RESULTS.md
