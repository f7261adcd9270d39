"""Every GPU figure in one call, for the few minutes a GPU machine is lent: one JSON and a markdown table.

    python bench/gpu.py                  # on the GPU: at most about 9 minutes
    python bench/gpu.py --dry-run        # the same parts on the CPU, each script's --small, in about a minute (CI)

Parts (each its own process with a time limit; one that fails is reported, the others still run):
  step       bench/train_step.py at batch 16, 64 and 256: img/s of the project's step and of the seed's in the
             same run, MFU against the device's peak, peak memory
  feed       the input path's samples/s (bench/loader.py, local lake, 1-3 loader workers) against what the step
             takes at batch 16: how many cores a GPU needs
  train      `recolor train --gpu` of two short epochs on a generated lake (wall time, images/s, final metrics)
  quality    bench/quality.py --gpu for a few minutes (needs ../shared/data; the dry run only checks it parses)
  colorize   `recolor colorize`'s local path at batch 32: images/s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_small, machine, sample_photos  # noqa: E402

sys.path.insert(0, str(REPO))  # ahead of bench/, whose ingest.py would hide the ingest package


def run_part(name: str, command: list[str], timeout: float, results: dict, env: dict | None = None) -> dict | None:
    """Run one part (a command printing one JSON object last); record its result or why it failed."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, **(env or {})})  # fmt: skip
    except subprocess.TimeoutExpired:
        results[name] = {"error": f"over its {timeout:.0f} s limit"}
        return None
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        results[name] = {"error": f"exit {done.returncode}: {tail[0][:300]}", "seconds": round(seconds, 1)}
        return None
    text = done.stdout
    start = text.find("{")
    try:
        value = json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        value = {"output": text.strip().splitlines()[-1:]}
    results[name] = value | {"seconds": round(seconds, 1)}
    return value


def has_rclone() -> bool:
    from infra.stack.s3_server import rclone_binary

    try:
        rclone_binary()
    except RuntimeError:
        return False
    return True


def colorize_rate(device: str, count: int, batch: int, base_filters: int) -> None:
    """(In a child process) images/s of the local colorize path; prints one JSON object."""
    from pipeline.colorize.files import ColorizeOptions
    from pipeline.colorize.local import colorize
    from pipeline.models.saved import GeneratorSpec, save_generator

    with tempfile.TemporaryDirectory(prefix="bench-gpu-colorize-") as scratch:
        root = Path(scratch)
        sample_photos(root / "photos", count)
        spec = GeneratorSpec("unet_256", "batch", base_filters, 8, 256)
        model = save_generator(spec.build(), spec, root / "model")
        options = ColorizeOptions(batch_size=batch, progress=False)
        colorize(str(model), [str(root / "photos")], str(root / "warm"), options, device=device)
        start = time.perf_counter()
        summary = colorize(str(model), [str(root / "photos")], str(root / "out"), options, device=device)
        seconds = time.perf_counter() - start
    print(json.dumps({"images": len(summary.written), "batch": batch, "images_per_s": len(summary.written) / seconds}))


def train_run(gpu: bool, tiny: bool, work: Path) -> None:
    """(In a child process) ingest generated photos and run `recolor train` of two short epochs; one JSON."""
    from ingest.driver import IngestConfig, run_ingest

    count = 48 if tiny else 512
    size = 64 if tiny else 256
    sample_photos(work / "photos", count)
    run_ingest(IngestConfig(kind="folder", source=str(work / "photos"), dataset="gpu-bench", lake=str(work / "lake"),
                            size=size, use_ray=False, progress=False))  # fmt: skip
    command = [sys.executable, "-m", "pipeline.cli", "train", str(REPO / "configs" / "tiny.yaml"), "--lake",
               str(work / "lake"), "--dataset", "gpu-bench", "--storage", str(work / "runs"), "--name", "gpu-bench",
               "--no-tracking", "--workers", "1", "--json", "stages=[{name: gan, epochs: 2}]"]  # fmt: skip
    command += ["--gpu", "data.batch_size=16"] if gpu else []
    command += ["model.base_filters=8", "model.num_downs=6", "data.batch_size=4"] if tiny else []
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=work, env={**os.environ,
                          "RECOLOR_NO_PROGRESS": "1"})  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"recolor train failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    result = json.loads(done.stdout[done.stdout.find("{") :])
    metrics = result.get("metrics", {})
    print(json.dumps({"seconds": seconds, "samples": count, "global_step": metrics.get("global_step"),
                      "val/l1_ab": metrics.get("val/l1_ab"),
                      "last_epoch_samples": metrics.get("data/epoch_samples")}))  # fmt: skip


def markdown(results: dict) -> str:
    rows = ["| part | figure |", "|---|---|"]
    for name, value in results.items():
        if not isinstance(value, dict):
            continue
        if "error" in value:
            rows.append(f"| {name} | failed: {value['error']} |")
            continue
        flat = {}
        for key, item in value.items():  # one level of nesting: loader_workers_samples_s {"1": ..., "2": ...}
            flat |= {f"{key}[{k}]": v for k, v in item.items()} if isinstance(item, dict) else {key: item}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in flat.items()
                          if isinstance(v, (int, float, str)) and not isinstance(v, bool))  # fmt: skip
        rows.append(f"| {name} | {shown} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same parts on the CPU with tiny sizes")
    parser.add_argument("--out", default=str(REPO / "bench" / "gpu-results.json"), help="where the JSON goes")
    parser.add_argument("--quality-minutes", type=float, default=3.0, help="bench/quality.py's budget on the GPU")
    parser.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data"),
        help="imagenet-sample/ and coco-sample/ for the quality part (default: ../shared/data)",
    )
    parser.add_argument("--part", dest="child", nargs="+", help=argparse.SUPPRESS)  # a child process's work
    add_small(parser)
    args = parser.parse_args()
    args.dry_run = args.dry_run or args.small  # this script's small mode is its dry run
    if args.child:
        kind, *rest = args.child
        if kind == "colorize":
            colorize_rate(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        elif kind == "train":
            train_run(rest[0] == "gpu", rest[1] == "tiny", Path(rest[2]))
        return 0

    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        print("no CUDA device here: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    device = "cuda" if gpu else "cpu"
    python = sys.executable
    results: dict = {"machine": machine(), "device": torch.cuda.get_device_name(0) if gpu else "cpu (dry run)",
                     "dry_run": args.dry_run}  # fmt: skip
    started = time.perf_counter()
    for batch in (16, 64, 256) if gpu else (2, 4):
        options = ["--steps", "5", "--warmup", "2"] if gpu else ["--small"]  # the script's own small mode
        run_part(f"step_batch{batch}", [python, "bench/train_step.py", "--device", device, "--batch", str(batch),
                                        "--json", *options], 150 if gpu else 120, results)  # fmt: skip
    # On the CPU the loader's small mode: every row of it, zstd and S3 too, in seconds.
    feed_command = [python, "bench/loader.py", "--json", *(("--skip-zstd", "--rounds", "1", "--count", "256",
                    "--loader-workers", *"1248") if gpu else ("--small",))]  # fmt: skip
    if not has_rclone():
        feed_command.append("--skip-s3")  # a lent GPU host has no rclone: the S3 rows are measured on the CI machine
    feed = run_part("feed", feed_command, 240, results)
    step16 = results.get("step_batch16" if gpu else "step_batch2", {}).get("project_img_s")
    if feed and step16:
        per_core = feed["loader_workers_samples_s"]["1"]  # one loader worker: one core
        results["feed"]["best_loader_samples_s"] = max(feed["loader_workers_samples_s"].values())
        results["feed"]["step_img_s"] = step16
        results["feed"]["cores_to_feed_the_step"] = step16 / per_core
    with tempfile.TemporaryDirectory(prefix="bench-gpu-train-") as scratch:
        run_part("train", [python, "bench/gpu.py", "--part", "train", "gpu" if gpu else "cpu",
                           "full" if gpu else "tiny", scratch], 240 if gpu else 180, results)  # fmt: skip
    if gpu:
        data = Path(args.data)
        run_part("quality", [python, "bench/quality.py", "--gpu", "--json", "--minutes", str(args.quality_minutes),
                             "--train", str(data / "imagenet-sample"), "--test", str(data / "coco-sample")],
                 60 * args.quality_minutes + 120, results)  # fmt: skip
    else:
        run_part("quality", [python, "bench/quality.py", "--help"], 60, results)  # parses: the GPU run can start
        results["quality"] = {"checked": "arguments parse; the run needs a GPU and ../shared/data"}
    run_part("colorize", [python, "bench/gpu.py", "--part", "colorize", device, "64" if gpu else "4",
                          "32" if gpu else "2", "64" if gpu else "4"], 180, results)  # fmt: skip
    results["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\n{results['seconds']:.0f} s; JSON in {args.out}")
    failed = [name for name, value in results.items() if isinstance(value, dict) and "error" in value]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
