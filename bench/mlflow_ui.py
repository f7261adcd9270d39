"""Screenshots of the MLflow UI in a real browser: what a person sees of a training run.

    python bench/mlflow_ui.py                                  # ./mlflow.db (after `make demo`), to outputs/mlflow-ui/
    python bench/mlflow_ui.py --tracking-uri sqlite:///path/mlflow.db --run RUN_ID --out shots/

Starts `mlflow server` on a free loopback port over the given store and opens, in headless Chromium (Debian's
`chromium` package, driven by Playwright: `pip install -e .[ui]`), the run's overview (its description: what ran
and the final metrics beside the gray baseline), its metric charts, its artifacts (the sample grids and the loss
curves), the experiment's chart view that training saves (`pipeline.tracking.charts`: the sections by prefix and
the sample grids by step) and, with two finished runs or more, MLflow's comparison of the latest two.

Each page is written as a PNG only once it has rendered: its charts drawn (Plotly's SVGs in place and no loading
spinner left) and, where the page shows pictures, a picture from the run's artifacts loaded in the page (an <img>
whose file arrived and decoded). A page that does not get there within --timeout-s is an error naming what was
missing; the screenshot is still written, to look at.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_small  # noqa: E402

sys.path.insert(0, str(REPO))  # ahead of bench/, whose ingest.py would hide the ingest package

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

# name: (the UI route below the server; window height; charts expected; an artifact picture expected)
PAGES = {
    "run_overview": ("#/experiments/{e}/runs/{r}", 1400, False, False),
    "run_metrics": ("#/experiments/{e}/runs/{r}/model-metrics", 3600, True, False),
    "run_artifacts": ("#/experiments/{e}/runs/{r}/artifacts/{grid}", 1100, False, True),  # the last sample grid
    "experiment_charts": ("{view}", 5200, True, True),  # the saved view: metrics by section, the grids by step
    "compare_runs": ('#/compare-runs?runs=["{r}","{r2}"]&experiments=["{e}"]', 2400, True, False),
}
RENDERED = """() => ({
    plots: document.querySelectorAll('.js-plotly-plot').length,
    drawn: document.querySelectorAll('.js-plotly-plot svg.main-svg').length,
    spinners: Array.from(document.querySelectorAll('.du-bois-light-spin, [class*="spinner"], [role="progressbar"]'))
        .filter(e => { const r = e.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; }).length,
    pictures: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0
        && !i.src.startsWith('data:')).length,  // the UI's own icons are inline; a run's pictures are fetched
})"""


def last_grid(client, run_id: str) -> str:
    """The path of the run's last sample grid artifact (samples/<stage>/epoch_NNN.png), or the folder."""
    found, folders = [], ["samples"]
    while folders:
        for item in client.list_artifacts(run_id, folders.pop()):
            (folders if item.is_dir else found).append(item.path)
    return max(found) if found else "samples"


def small_store(root: Path) -> str:
    """(`--small`) A store of two finished runs as training leaves them, in brief: metrics over three steps in
    the training's sections, a sample grid per step (a file under samples/ and MLflow's image of the run), the
    experiment's saved chart view."""
    import io

    from mlflow import MlflowClient
    from PIL import Image

    from pipeline.tracking.charts import SAMPLES_KEY, save_chart_view
    from pipeline.tracking.loggers import MlflowLogger

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("recolor", artifact_location=(root / "artifacts").as_uri())
    for index in range(2):
        run_id = client.create_run(experiment_id, run_name=f"small-{index}").info.run_id
        logger = MlflowLogger(uri, run_id, system_metrics=False)
        for step in range(1, 4):
            logger.log({"train/loss_G": 2.0 / step + index, "val/l1_ab": 0.1 / step + index}, step)
            grid = io.BytesIO()
            Image.new("RGB", (96, 32), (40 * step, 90, 160)).save(grid, format="PNG")
            logger.log_image(grid.getvalue(), f"samples/gan/epoch_{step:03d}.png", key=SAMPLES_KEY, step=step)
        client.set_terminated(run_id, "FINISHED")
    save_chart_view(client, experiment_id, 3)
    return uri


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install chromium (Debian) or pass --browser")


def capture(page, url: str, target: Path, height: int, charts: bool, picture: bool, timeout_s: float) -> dict:
    """Open `url`, scroll it through and back (chart cards draw as they come into view), wait until what is in
    the window has rendered, write the screenshot; returns what rendered and what is missing."""
    page.set_viewport_size({"width": 1500, "height": height})
    page.goto(url, wait_until="load")
    time.sleep(2.0)
    page.mouse.move(750, height // 2)
    for delta in [800] * 12 + [-800] * 12:
        page.mouse.wheel(0, delta)
        time.sleep(0.2)
    deadline = time.monotonic() + timeout_s
    state, missing = {}, ["the page"]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        state = page.evaluate(RENDERED)
        missing = []
        if charts and (not state["plots"] or state["drawn"] < state["plots"]):
            missing.append(f"charts ({state['drawn']} of {state['plots']} drawn)")
        if state["spinners"]:
            missing.append(f"{state['spinners']} loading spinner(s)")
        if picture and not state["pictures"]:
            missing.append("a picture from the run's artifacts")
        if not missing:
            time.sleep(1.0)  # the last frame of any transition
            break
    page.screenshot(path=str(target))
    return {"state": state, "missing": missing}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="the store (default: ./mlflow.db)")
    parser.add_argument("--experiment", default="recolor")
    parser.add_argument("--run", help="run id (default: the experiment's latest finished run)")
    parser.add_argument("--out", default="outputs/mlflow-ui", help="folder for the PNGs")
    parser.add_argument("--browser", help="Chromium's path (default: found on PATH)")
    parser.add_argument("--timeout-s", type=float, default=90, help="time a page gets to render (default: 90)")
    add_small(parser)
    args = parser.parse_args()
    import tempfile

    from mlflow import MlflowClient

    scratch = tempfile.TemporaryDirectory(prefix="bench-mlflow-ui-")
    if args.small:  # a generated store; without Chromium and Playwright, every page's address and picture over HTTP
        args.tracking_uri = small_store(Path(scratch.name))
        args.out = args.out if args.out != parser.get_default("out") else f"{scratch.name}/shots"

    from infra.stack.s3_server import free_port

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.tracking_uri}: run `make demo` first")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=2,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    run_id = args.run or (runs[0].info.run_id if runs else None)
    if run_id is None:
        raise SystemExit(f"no finished run in {args.experiment!r}")
    shots = not args.small or has_browser(args.browser)
    chrome = (args.browser or browser()) if shots else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as `recolor stack up`: no Huey consumers polling
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
        from pipeline.tracking.charts import chart_view_route

        other = next((run.info.run_id for run in runs if run.info.run_id != run_id), None)
        view = chart_view_route(experiment.experiment_id)
        names = {
            "e": experiment.experiment_id,
            "r": run_id,
            "r2": other,
            "view": view,
            "grid": last_grid(client, run_id),
        }
        if not shots:
            return check_over_http(base, client, names)
        from playwright.sync_api import sync_playwright

        failed = []
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=chrome, args=["--no-sandbox", "--disable-gpu"])
            page = chromium.new_page()
            for name, (route, height, charts, picture) in PAGES.items():
                if "{r2}" in route and names["r2"] is None:
                    print(f"{name}: skipped (one finished run: nothing to compare)")
                    continue
                target = out / f"{name}.png"
                seen = capture(page, base + route.format(**names), target, height, charts, picture, args.timeout_s)
                state = seen["state"]
                if seen["missing"]:
                    failed.append(name)
                    print(f"{target}  NOT RENDERED: missing {', '.join(seen['missing'])}")
                else:
                    print(f"{target}  ({state.get('drawn', 0)} charts, {state.get('pictures', 0)} pictures)")
            chromium.close()
        if failed:
            raise SystemExit(f"pages that did not render within {args.timeout_s:g} s: {', '.join(failed)}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        scratch.cleanup()
    return 0


def has_browser(path: str | None) -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return bool(path or any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")))


def check_over_http(base: str, client, names: dict) -> int:
    """(`--small` without a browser) The UI's page and each page's data over the server's HTTP API: the run, its
    metric history, the sample grid it would show, the experiment's saved view and the run to compare."""
    import json
    import urllib.parse

    from pipeline.tracking.charts import VIEW_TAG

    def get(path: str) -> bytes:
        with urllib.request.urlopen(base + path, timeout=30) as answer:
            return answer.read()

    assert b"<html" in get("").lower(), "the UI's page"
    for name, route in ((name, PAGES[name][0].format(**names)) for name in PAGES):
        print(f"{name}: {base}{route}")
    run = json.loads(get(f"api/2.0/mlflow/runs/get?run_id={names['r']}"))["run"]
    history = json.loads(get(f"api/2.0/mlflow/metrics/get-history?run_id={names['r']}&metric_key=train/loss_G"))
    grid = get(f"get-artifact?path={urllib.parse.quote(names['grid'])}&run_uuid={names['r']}")
    experiment = json.loads(get(f"api/2.0/mlflow/experiments/get?experiment_id={names['e']}"))["experiment"]
    tags = {tag["key"] for tag in experiment.get("tags", [])}
    assert run["info"]["status"] == "FINISHED" and len(history["metrics"]) == 3, (run["info"], history)
    assert grid.startswith(b"\x89PNG") and names["r2"] is not None, names
    assert VIEW_TAG in tags, tags  # the saved view the experiment_charts page opens
    print(f"no browser: every page's data answered over HTTP (run {names['r']}, grid {names['grid']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
