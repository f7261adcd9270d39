"""Screenshots of the MLflow UI in a real browser: what a person sees of a training run.

    python bench/mlflow_ui.py                                  # ./mlflow.db (after `make demo`), to outputs/mlflow-ui/
    python bench/mlflow_ui.py --tracking-uri sqlite:///path/mlflow.db --run RUN_ID --out shots/

Starts `mlflow server` on a free loopback port over the given store and opens, in headless
Chromium (Debian's `chromium` package), the run's overview (its description: what ran and the
final metrics beside the gray baseline), its metric charts, its artifacts (the sample grids and the
loss curves) and the experiment's chart view (the `validation_samples` images by step). Each page
is written as a PNG; the script checks that each is a real rendering (not blank) and prints the paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

PAGES = {  # name: (the UI route below the server, {e} the experiment id, {r} the run id; window height)
    "run_overview": ("#/experiments/{e}/runs/{r}", 1400),
    "run_metrics": ("#/experiments/{e}/runs/{r}/model-metrics", 3600),  # the charts, then the images by step
    "run_artifacts": ("#/experiments/{e}/runs/{r}/artifacts/samples", 1100),
    "experiment_charts": ("#/experiments/{e}/runs?compareRunsMode=CHART", 4400),  # metrics, then images
}


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install chromium (Debian) or pass --browser")


def screenshot(chrome: str, url: str, target: Path, wait_ms: int, height: int) -> None:
    subprocess.run(
        [chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size=1500,{height}",
         f"--virtual-time-budget={wait_ms}", f"--screenshot={target}", url],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def distinct_colours(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return len(image.convert("RGB").resize((300, 220)).getcolors(maxcolors=1 << 16) or [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="the store (default: ./mlflow.db)")
    parser.add_argument("--experiment", default="recolor")
    parser.add_argument("--run", help="run id (default: the experiment's latest finished run)")
    parser.add_argument("--out", default="outputs/mlflow-ui", help="folder for the PNGs")
    parser.add_argument("--browser", help="Chromium's path (default: found on PATH)")
    parser.add_argument("--wait-ms", type=int, default=15000, help="time the page gets to render (virtual ms)")
    args = parser.parse_args()

    from mlflow import MlflowClient

    from infra.stack.s3_server import free_port

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.tracking_uri}: run `make demo` first")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=1,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    run_id = args.run or (runs[0].info.run_id if runs else None)
    if run_id is None:
        raise SystemExit(f"no finished run in {args.experiment!r}")
    chrome = args.browser or browser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "health", timeout=3):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("mlflow server did not start") from None
                time.sleep(0.5)
        for name, (route, height) in PAGES.items():
            target = out / f"{name}.png"
            url = base + route.format(e=experiment.experiment_id, r=run_id)
            screenshot(chrome, url, target, args.wait_ms, height)
            colours = distinct_colours(target)
            verdict = "ok" if colours > 20 else "BLANK?"
            print(f"{target}  ({colours} colours: {verdict})")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
