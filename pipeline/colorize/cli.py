"""`recolor colorize`: parsing and printing only (the work is `local.py` or, with --ray, `cluster.py`)."""

from __future__ import annotations

import sys

from ingest.images import DEFAULT_MAX_PIXELS
from pipeline.colorize.files import CHUNK_FRAMES, CODECS, DEFAULT_CRF, PICTURE_FORMATS

MODEL_HELP = (
    "models:/NAME@ALIAS (e.g. models:/colorizer@champion), models:/NAME/VERSION, runs:/ID/generator, "
    "an MLflow model folder or a checkpoint path"
)
TRUST_PICKLE_HELP = (
    "load a model of the old pickled format (registered before recolor 0.1's pickle-free format); "
    "that runs code stored in the model: only for a registry you trust"
)


def add_colorize_parser(subparsers) -> None:
    from ingest.cli import positive_int
    from pipeline.evaluation.cli import TRACKING_HELP, device_arg

    colorize = subparsers.add_parser(
        "colorize",
        help="color photos with a generator, at full resolution (one process, or a Ray Data job with --ray)",
        description="Colorize images (files, folders recursively, s3:// prefixes; any format ingest accepts, gray "
        "ones included) with a registered generator or a checkpoint, into a folder or an s3:// prefix. Outputs have "
        "the original size (EXIF orientation applied) and the input's L channel, named like the inputs below the "
        "given folders. Pictures are written whole; a rerun skips those already there (see --overwrite). With --ray "
        "the same colorization runs as a Ray Data job: decoding in CPU tasks, the generator in an actor pool "
        "(--actors, one GPU each with --gpu, bf16), writing in CPU tasks.",
        epilog="An input that cannot be colorized does not stop the others: each is printed on stderr as "
        "`skipped INPUT: REASON: DETAIL`, REASON one of empty, not_an_image, corrupt, too_large (see --max-pixels), "
        "missing, unreadable, no_images (a given folder without images), name_clash (two inputs, one output name), "
        "unwritable, not_ours (--overwrite of a file recolor did not write). "
        "Exit status: 0 when every input was colorized, 1 when some were skipped, 2 for a bad model or "
        "option. Example: recolor colorize scans/ -o colored/ --model models:/colorizer@champion",
    )
    colorize.add_argument("inputs", nargs="+", metavar="INPUT")
    colorize.add_argument("--model", required=True, help=MODEL_HELP)
    colorize.add_argument("-o", "--out", required=True, help="output folder or s3:// prefix")
    colorize.add_argument(
        "--size", type=positive_int, help="network input side (default: the side the model trained at)"
    )
    colorize.add_argument("--batch-size", type=positive_int, default=8)
    colorize.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip larger images as too_large (decompression bombs; default: {DEFAULT_MAX_PIXELS})",
    )
    colorize.add_argument("--device", type=device_arg, default=None,
                          help="without --ray: cpu, cuda or cuda:N (default: cuda when there is one)")  # fmt: skip
    colorize.add_argument("--tracking-uri", help=TRACKING_HELP)
    colorize.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    colorize.add_argument(
        "--dropout",
        action="store_true",
        help="keep the generator's dropout on, as pix2pix tests (sampled colours; default: eval mode, deterministic)",
    )
    colorize.add_argument("--no-progress", dest="progress", action="store_false")
    _add_output_options(colorize.add_argument_group("outputs"))
    _add_ray_options(colorize.add_argument_group("on Ray"), positive_int)
    _add_video_options(colorize.add_argument_group("videos"), positive_int)
    colorize.set_defaults(handler=run_colorize)


def _add_output_options(group) -> None:
    group.add_argument("--format", dest="picture_format", choices=PICTURE_FORMATS, default="png",
                       help="png (lossless, default) or jpeg")  # fmt: skip
    group.add_argument("--quality", type=int, default=95, help="JPEG quality 1-95 (default: 95)")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="colorize again pictures an earlier run wrote into the output (its ledger lists them)",
    )
    group.add_argument(
        "--overwrite-any",
        action="store_true",
        help="with --overwrite: also replace files of the same name that recolor did not write",
    )
    group.add_argument(
        "--side-by-side",
        metavar="PNG",
        help="also write one picture comparing, for each photo (at most 16), its gray input, the colorized picture "
        "and the photo itself (without --ray)",
    )


def _add_ray_options(group, positive_int) -> None:
    group.add_argument("--ray", action="store_true", help="run as a Ray Data job (local instance or cluster)")
    group.add_argument("--ray-address", help="with --ray: the cluster (default: $RAY_ADDRESS, else local)")
    group.add_argument("--actors", type=positive_int, default=1, help="with --ray: generator actors (default: 1)")
    group.add_argument("--gpu", action="store_true", help="with --ray: one GPU per actor, bf16")


def _add_video_options(group, positive_int) -> None:
    group.add_argument("--codec", choices=sorted(CODECS), default="h264",
                       help="videos: the encoder (default: h264; ffv1 is lossless RGB)")  # fmt: skip
    group.add_argument(
        "--crf",
        type=int,
        default=DEFAULT_CRF,
        help=f"videos: quality, lower is better (default: {DEFAULT_CRF}; 0: lossless h264 4:4:4)",
    )
    group.add_argument("--no-temporal", dest="temporal", action="store_false",
                       help="videos: colorize each frame alone (default: carry colour along the optical flow, "
                       "against flicker)")  # fmt: skip
    group.add_argument("--chunk-frames", type=positive_int, default=CHUNK_FRAMES,
                       help=f"videos with --ray: frames a chunk holds at least, cut at keyframes; chunks are "
                       f"colorized in parallel, one per actor, and a rerun keeps those done (default: "
                       f"{CHUNK_FRAMES})")  # fmt: skip


def run_colorize(args) -> int:
    from ingest.errors import ConfigError
    from pipeline.evaluation.cli import default_device

    default_device(args)

    if not 1 <= args.quality <= 95:
        raise ConfigError(f"--quality must be in 1..95, got {args.quality}")
    if args.batch_size < 1 or args.actors < 1:
        raise ConfigError("--batch-size and --actors must be at least 1")
    if not 0 <= args.crf <= 51:
        raise ConfigError(f"--crf must be in 0..51 (lower is better), got {args.crf}")
    if args.ray and args.side_by_side:
        raise ConfigError("--side-by-side applies without --ray (one process sees every picture)")
    if not args.ray and (args.gpu or args.ray_address or args.actors != 1):
        raise ConfigError("--gpu, --ray-address and --actors apply with --ray only (without it, use --device)")
    from pipeline.colorize.files import ColorizeOptions

    options = ColorizeOptions(
        size=args.size,
        batch_size=args.batch_size,
        tracking_uri=args.tracking_uri,
        progress=args.progress,
        max_pixels=args.max_pixels,
        picture_format=args.picture_format,
        quality=args.quality,
        overwrite=args.overwrite or args.overwrite_any,
        overwrite_any=args.overwrite_any,
        trust_pickle=args.trust_pickle,
        dropout=args.dropout,
        side_by_side=args.side_by_side,
    )
    from pipeline.colorize.video import list_videos

    videos, args.inputs, refused = list_videos(args.inputs, args.out)
    code = run_videos(args, videos, refused) if videos or refused else 0
    if not args.inputs:
        return code
    if args.ray:
        from pipeline.colorize.cluster import colorize_on_ray

        summary = colorize_on_ray(
            args.model, args.inputs, args.out, options, actors=args.actors, gpu=args.gpu, ray_address=args.ray_address
        )
    else:
        from pipeline.colorize.local import colorize

        summary = colorize(args.model, args.inputs, args.out, options, device=args.device)
    skipped = f"; {len(summary.skipped)} already there (pass --overwrite to redo)" if summary.skipped else ""
    print(f"colorized {len(summary.written)} image(s) into {args.out}{skipped}")
    for uri, reason in summary.failed:
        print(f"  skipped {uri}: {reason}", file=sys.stderr)
    if summary.side_by_side:
        print(f"side by side: {summary.side_by_side}")
    if summary.failed:
        print(f"recolor: error: {len(summary.failed)} input(s) could not be colorized", file=sys.stderr)
    if summary.side_by_side_error:
        print(f"recolor: error: the comparison picture was not written: {summary.side_by_side_error}", file=sys.stderr)
    return 1 if summary.failed or summary.side_by_side_error else code


def run_videos(args, videos: list[tuple[str, str]], refused: list[tuple[str, str]]) -> int:
    """Colorize each video (`pipeline.colorize.video`); a refused one does not stop the others. Returns 1 when
    some video was not colorized, else 0."""

    import torch

    from pipeline.colorize.local import load_model
    from pipeline.colorize.video import VideoOptions, VideoRefused, colorize_video, uri_exists, written_by_recolor
    from pipeline.models import set_inference_mode

    device = torch.device(args.device)
    options = VideoOptions(codec=args.codec, crf=args.crf, temporal=args.temporal, batch_size=args.batch_size,
                           max_pixels=args.max_pixels)  # fmt: skip
    failed, todo = list(refused), []
    for src, dst in videos:
        if not uri_exists(dst):
            todo.append((src, dst))
        elif not (args.overwrite or args.overwrite_any) and written_by_recolor(dst):
            print(f"  {dst} is there already (pass --overwrite to redo)")
        elif not (args.overwrite or args.overwrite_any):  # a file recolor did not write blocks it: not done
            failed.append((src, f"not_ours: {dst} exists and recolor did not write it; --overwrite-any replaces it"))
        elif args.overwrite_any or written_by_recolor(dst):
            todo.append((src, dst))
        else:
            failed.append((src, f"not_ours: {dst} exists and recolor did not write it; --overwrite-any replaces it"))
    if todo:
        device = torch.device("cpu") if args.ray else device  # with --ray the tasks run the network
        generator, size, resize = load_model(args.model, args.tracking_uri, device, args.trust_pickle, args.size)
        set_inference_mode(generator, args.dropout)
        for src, dst in todo:
            try:
                if args.ray:
                    from pipeline.colorize.chunks import colorize_video_on_ray

                    chunked = colorize_video_on_ray(
                        generator, args.model, size, resize, src, dst, options, chunk_frames=args.chunk_frames,
                        actors=args.actors, gpu=args.gpu, dropout=args.dropout, ray_address=args.ray_address,
                        progress=args.progress,
                    )  # fmt: skip
                    result = chunked.result
                    reused = f", {chunked.reused} from an earlier run" if chunked.reused else ""
                    print(f"  {src}: {chunked.chunks} chunk(s) cut at keyframes{reused}")
                else:
                    result = colorize_video(generator, size, resize, device, src, dst, options, args.progress)
            except VideoRefused as e:
                failed.append((src, e.reason))
                continue
            extra = f"; {result.note}" if result.note else ""
            print(f"colorized {src} -> {dst}: {result.frames} frames, {result.seconds:.1f} s at {result.fps:.3g} fps"
                  f"{', audio copied' if result.audio else ''} ({result.frames / max(result.elapsed, 1e-9):.1f} "
                  f"frames/s){extra}")  # fmt: skip
    for src, reason in failed:
        print(f"  skipped {src}: {reason}", file=sys.stderr)
    if failed:
        print(f"recolor: error: {len(failed)} video(s) could not be colorized", file=sys.stderr)
        return 1
    return 0
