"""Colorizing throughput: the single-process command against the Ray Data job with 1 and 2 CPU actors.

    python bench/colorize.py                   # 256 generated 500x375 photos, the full recipe's U-Net
    python bench/colorize.py --count 64 --json
    python bench/colorize.py --video          # films: frames/s and flicker with and without the temporal step

Every configuration colorizes the same photos with the same generator (the recipe's 54.4M-parameter
U-Net at 256 px, untrained: the cost does not depend on the weights) into a fresh folder, through
the code the commands run (`pipeline.colorize.local.colorize`, `pipeline.colorize.cluster.colorize_on_ray`).
The single-process command uses torch's threads on every core; a Ray actor holds one CPU. The Ray
job's time includes its start (listing, the model put into the object store, the actors' start), not
the local Ray instance's. With a GPU, images/s per GPU at batch 32 on one actor is printed too.

--video: two generated 5-second clips at 320x240 and 10 fps whose motion is known (a still scene with camera
noise of +-4 levels; a picture panned 2 px a frame), colorized through `pipeline.colorize.video` with and
without the temporal step, one process (one actor's share: torch on one thread). Reported: frames/s, and
flicker, the mean absolute change of a and b between consecutive frames where the scene does not move (the
whole still scene; none of the pan): of the colour the network adds (at its resolution: what the step
controls) and of the output (which also moves with the noise of the source's L, kept by design). The
generator is the recipe's U-Net untrained, its last layer 30x stronger so that its colours follow the noise
as an undertrained model's do (an untrained one's hardly move).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, add_small, machine, sample_photos  # noqa: E402

sys.path.insert(0, str(REPO))  # ahead of bench/, whose ingest.py would hide the ingest package

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def ab_change(sequence) -> float:
    """Mean absolute change of ab (network units x AB_NORM: CIE Lab units) between consecutive frames."""
    from ingest.lab import AB_NORM

    steps = [float((b - a).abs().mean()) for a, b in zip(sequence, sequence[1:], strict=False)]
    return AB_NORM * sum(steps) / len(steps)


def ray_film_rates(generator, src: Path, root: Path, actors_tried: tuple[int, ...] = (1, 2)) -> dict:
    """The panned clip through `recolor colorize --ray`'s film path (`pipeline.colorize.chunks`: chunks of 10
    frames, the temporal step in the joining pass) on a local Ray instance with 1 and 2 CPU actors: frames/s in
    all, and the joining pass's share of the time."""
    import torch

    from ingest.cluster import ensure_ray
    from pipeline.colorize.chunks import colorize_video_on_ray
    from pipeline.colorize.video import VideoOptions

    rates = {}
    with ensure_ray(None, 2):  # a local instance, or the cluster in $RAY_ADDRESS (CI's small run joins its tests')
        for actors in actors_tried:
            started = time.perf_counter()
            done = colorize_video_on_ray(generator, "bench", 256, "cover", str(src), str(root / f"ray{actors}.mkv"),
                                         VideoOptions(codec="ffv1"), chunk_frames=10, actors=actors,
                                         progress=False)  # fmt: skip
            seconds = time.perf_counter() - started
            rates[f"actors_{actors}"] = {"frames_per_s": done.result.frames / seconds, "chunks": done.chunks,
                                         "join_seconds": done.result.elapsed, "seconds": seconds}  # fmt: skip
            print(f"ray, {actors} actor(s)   {done.result.frames / seconds:6.2f} frames/s  ({done.chunks} chunks; "
                  f"joining pass {done.result.elapsed:.1f} of {seconds:.1f} s)", flush=True)  # fmt: skip
    torch.set_num_threads(1)
    return rates


def video_bench(seconds: int = 5, fps: int = 10, base_filters: int = 64, actors: tuple[int, ...] = (1, 2)) -> dict:
    """Frames/s and flicker of the still and the panned clip, with and without the temporal step."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from fixtures.videos import clip_frames, read_clip, write_clip

    from pipeline.colorize.pixels import network_input, predict_photos
    from pipeline.colorize.temporal import FlowSmoother, flicker, warping_error
    from pipeline.colorize.video import VideoOptions, colorize_video
    from pipeline.models.saved import GeneratorSpec, min_side

    torch.set_num_threads(1)
    spec = GeneratorSpec("unet_256", "batch", base_filters, 8, 256)
    generator = spec.build().eval()
    last = [m for m in generator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        last.weight.mul_(30)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-video-") as scratch:
        root = Path(scratch)
        for scene in ("still", "pan"):
            frames = clip_frames(seconds * fps, 320, 240, still=scene == "still")
            src = write_clip(root / f"{scene}.mkv", frames, fps=fps)
            inputs = [network_input(f, 256, min_side(generator), "cover") for f in frames]
            predicted = []
            for start in range(0, len(inputs), 8):
                predicted += predict_photos(generator, inputs[start : start + 8], torch.device("cpu"))
            smoother = FlowSmoother()
            smoothed = [smoother(x[:, : c[0], : c[1]], ab) for (x, c), ab in zip(inputs, predicted, strict=True)]
            motion = (0.0, 0.0) if scene == "still" else (2.0, 0.0)  # the clip's: where a pixel was a frame before
            results[f"{scene}_source_warping_error"] = warping_error(frames, frames, motion)  # the floor: L is kept
            for temporal in (False, True):
                name = f"{scene}_{'temporal' if temporal else 'plain'}"
                options = VideoOptions(codec="ffv1", temporal=temporal)
                result = colorize_video(generator, 256, "cover", torch.device("cpu"), str(src),
                                        str(root / f"{name}.mkv"), options, progress=False)  # fmt: skip
                added = smoothed if temporal else predicted
                written = read_clip(root / f"{name}.mkv")[0]
                row = {"frames_per_s": result.frames / result.elapsed, "network_ab_change": ab_change(added),
                       "warping_error": warping_error(written, frames, motion)}  # fmt: skip
                if scene == "still":
                    row["output_flicker"] = flicker(written)
                results[name] = row
                print(f"{name:16} {row['frames_per_s']:6.2f} frames/s  network ab change {row['network_ab_change']:.4f}"
                      f"  warping error {row['warping_error']:.5f}"
                      + (f"  output flicker {row['output_flicker']:.4f}" if "output_flicker" in row else ""),
                      flush=True)  # fmt: skip
            if scene == "pan":
                results["ray"] = ray_film_rates(generator, src, root, actors)
        still_plain, still_smooth = results["still_plain"], results["still_temporal"]
        results["still_network_flicker_ratio"] = still_smooth["network_ab_change"] / still_plain["network_ab_change"]
        results["cost_ratio"] = still_plain["frames_per_s"] / still_smooth["frames_per_s"]
    print(
        f"still scene: the network's ab change x{results['still_network_flicker_ratio']:.2f} with the step; "
        f"cost per frame x{results['cost_ratio']:.2f}"
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=256, help="photos (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--video", action="store_true", help="films instead: frames/s and flicker (see above)")
    parser.add_argument("--json", action="store_true")
    add_small(parser)
    args = parser.parse_args()
    base_filters = 8 if args.small else 64  # small: a U-Net of 1/64 the full recipe's work, one Ray actor
    actors = (1,) if args.small else (1, 2)
    if args.small:
        args.count, args.batch_size = 4, 2
    if args.video:
        report = {"machine": machine(), **video_bench(1 if args.small else 5, base_filters=base_filters, actors=actors)}
        if args.json:
            print(json.dumps(report, indent=2))
        return 0

    import torch

    from ingest.cluster import ensure_ray
    from pipeline.colorize.cluster import colorize_on_ray
    from pipeline.colorize.files import ColorizeOptions
    from pipeline.colorize.local import colorize
    from pipeline.models.saved import GeneratorSpec, save_generator

    results = {"machine": machine(), "count": args.count, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="bench-colorize-") as scratch:
        root = Path(scratch)
        sample_photos(root / "photos", args.count)
        spec = GeneratorSpec("unet_256", "batch", base_filters, 8, 256)
        model = save_generator(spec.build(), spec, root / "model")

        def timed(name: str, run) -> None:
            start = time.perf_counter()
            summary = run(str(root / name))
            seconds = time.perf_counter() - start
            assert len(summary.written) == args.count and not summary.failed, summary.failed[:3]
            results[name] = {"seconds": round(seconds, 2), "images_per_s": round(args.count / seconds, 2)}
            print(f"{name:<18} {seconds:8.1f} s  {args.count / seconds:7.2f} images/s", flush=True)

        inputs = [str(root / "photos")]
        options = ColorizeOptions(batch_size=args.batch_size, progress=False)
        timed("single_process", lambda out: colorize(str(model), inputs, out, options))
        with ensure_ray(None):  # a local instance, or the cluster in $RAY_ADDRESS
            for n in actors:
                timed(f"ray_{n}_actor", lambda out, n=n: colorize_on_ray(str(model), inputs, out, options, n))
            if torch.cuda.is_available():
                timed("ray_1_gpu_batch32", lambda out: colorize_on_ray(
                    str(model), inputs, out, ColorizeOptions(batch_size=32, progress=False), gpu=True))  # fmt: skip
    base = results["single_process"]["images_per_s"]
    for name in [key for key in results if key.startswith("ray_")]:
        results[name]["vs_single_process"] = round(results[name]["images_per_s"] / base, 2)
        print(f"{name} / single_process: {results[name]['vs_single_process']:.2f}x")
    if not any(key.endswith("gpu_batch32") for key in results):
        print("no GPU here: images/s per GPU not measured")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
