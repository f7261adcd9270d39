"""`recolor ingest ...` and `recolor lake ...`: argument parsing and printing, nothing else.

About 470 lines on purpose: the two command families' options, help and printing, which share the lake's argument
handling; the work itself is in the driver, lake, fsck and gc modules.
"""

from __future__ import annotations

import argparse
import json
import sys

from ingest.chunk import ORDERS
from ingest.images import DEFAULT_MAX_PIXELS, DEFAULT_RESIZE, DEFAULT_SIDE, RESIZE_MODES
from ingest.lake import LAKE_ENV, SPLITS, URL_FORMS, Lake, LakeError
from ingest.storage.base import parse_size


def parse_bytes(text: str) -> int:
    """An argparse type: `ingest.storage.parse_size`."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (`--size 0`, `--max-pixels -1` are slips, not requests)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _categories(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_ingest_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="turn an image set into a new version of a lake dataset",
        description="Shard ImageNet, COCO or any image folder (local or s3://) into WebDataset tar shards of "
        "precomputed Lab arrays, with a Parquet manifest, as a new immutable version of a lake dataset. "
        "Re-running adds only new images; an interrupted run resumes.",
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{imagenet,coco,folder}")
    imagenet = kinds.add_parser("imagenet", help="ImageNet layout: train/<wnid>/*.JPEG (and val/)")
    coco = kinds.add_parser("coco", help="COCO layout: <split>2017/*.jpg listed by an annotation JSON")
    folder = kinds.add_parser("folder", help="any tree of images (jpg, png, webp, bmp, tif, gif)")
    imagenet.add_argument(
        "--source-split",
        dest="imagenet_splits",
        default="train",
        type=lambda s: tuple(s.split(",")),
        help="ImageNet folders to read: train, val or train,val (default: train)",
    )
    coco.add_argument("--annotations", required=True, help="COCO-format JSON (instances, panoptic or captions)")
    coco.add_argument("--split", dest="coco_split", help="image folder, e.g. val2017 (default: from the JSON's name)")
    coco.add_argument("--category", dest="categories", type=_categories, default=(), help="e.g. person,dog")
    for sub in (imagenet, coco, folder):
        sub.add_argument("source", help="source root: a local folder or s3://bucket/prefix")
        sub.add_argument("--dataset", required=True, help="lake dataset to create or extend, e.g. imagenet-5k")
        sub.add_argument("--lake", help=f"lake URI: a folder or s3://bucket/prefix (default: ${LAKE_ENV}, else ./lake)")
        sub.add_argument("--size", type=positive_int, default=DEFAULT_SIDE,
                         help=f"output side in pixels (default: {DEFAULT_SIDE})")  # fmt: skip
        sub.add_argument(
            "--resize",
            choices=RESIZE_MODES,
            default=DEFAULT_RESIZE,
            help="cover: shorter side to --size then center crop (default); squash: plain resize, as the recipe",
        )
        sub.add_argument(
            "--limit", type=positive_int, help="ingest at most N images (ImageNet: spread evenly over classes)"
        )
        sub.add_argument("--seed", type=int, default=0, help="seed of the --limit subset and shard order (default: 0)")
        sub.add_argument(
            "--order",
            choices=ORDERS,
            default="shuffled",
            help="shuffled: items go into shards in a seeded random order, so every shard (and batch) mixes "
            "classes (default); sorted: by path, as listed",
        )
        sub.add_argument(
            "--rehash",
            action="store_true",
            help="read and hash every listed file; by default a re-ingest skips files the dataset already holds "
            "with the same size and ETag/mtime",
        )
        sub.add_argument(
            "--val-fraction",
            type=float,
            default=0.2,
            help="validation share, decided by content hash (default: 0.2; 1: every sample is validation, a "
            "dataset to score models on, e.g. COCO for an ImageNet-trained model)",
        )
        sub.add_argument("--shard-size", type=parse_bytes, default="64MB", help="target training shard size")
        sub.add_argument(
            "--max-pixels",
            type=positive_int,
            default=DEFAULT_MAX_PIXELS,
            help="refuse larger images (decompression bombs)",
        )
        sub.add_argument("--workers", type=positive_int, help="CPUs of the local Ray instance (default: all)")
        sub.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else local)")
        sub.add_argument("--no-ray", dest="use_ray", action="store_false", help="run in this process (debugging)")
        sub.add_argument("--json", action="store_true", help="print the summary as JSON")
        sub.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
        sub.set_defaults(handler=run_ingest_command)


def run_ingest_command(args) -> int:
    from ingest.driver import IngestConfig, run_ingest

    config = IngestConfig(
        kind=args.kind,
        source=args.source,
        dataset=args.dataset,
        lake=args.lake,
        size=args.size,
        resize=args.resize,
        limit=args.limit,
        seed=args.seed,
        val_fraction=args.val_fraction,
        order=args.order,
        rehash=args.rehash,
        shard_size=args.shard_size,
        max_pixels=args.max_pixels,
        annotations=getattr(args, "annotations", None),
        coco_split=getattr(args, "coco_split", None),
        categories=getattr(args, "categories", ()),
        imagenet_splits=getattr(args, "imagenet_splits", ("train",)),
        workers=args.workers,
        ray_address=args.ray_address,
        use_ray=args.use_ray,
        progress=args.progress and not args.json,
    )
    summary = run_ingest(config)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    rejected = ", ".join(f"{reason} {count}" for reason, count in summary.rejected.items()) or "none"
    rate = summary.listed / summary.seconds if summary.seconds else 0.0
    unchanged = f"unchanged {summary.unchanged} (not read again), " if summary.unchanged else ""
    print(
        f"listed {summary.listed}, {unchanged}ingested {summary.ingested}, duplicates {summary.duplicates}, "
        f"rejected: {rejected}  ({summary.seconds:.1f} s, {rate:.1f} img/s)"
    )
    if summary.resumed_chunks:
        print(f"resumed: {summary.resumed_chunks} chunk(s) were already done by an earlier run")
    if summary.version is None:
        where = f"{summary.dataset}@{summary.parent}" if summary.parent else summary.dataset
        print(f"nothing new: {where} already holds every image of this source; no version written")
    else:
        counts = ", ".join(f"{split} {n}" for split, n in summary.counts.items())
        print(f"committed {summary.dataset}@{summary.version} ({counts})")
    return 0


def add_lake_parser(subparsers) -> None:
    parser = subparsers.add_parser("lake", help="list and inspect lake datasets and versions")
    commands = parser.add_subparsers(dest="lake_command", required=True)
    ls = commands.add_parser("ls", help="list datasets with their latest version and counts")
    show = commands.add_parser("show", help="show one version: counts, bytes, shards, rejects, history")
    show.add_argument("ref", metavar="NAME[@VERSION]", help="dataset, optionally @version (default: latest)")
    show.add_argument("--rejects", type=int, default=5, metavar="N", help="list N rejected files (default: 5)")
    gc = commands.add_parser(
        "gc",
        help="list objects no version references (left by interrupted ingests); delete them with --delete",
        description="List the objects of a dataset (or of every dataset) that no version record references: shards "
        "and resume records of ingests that never committed, or whose results a later commit superseded. Nothing is "
        "deleted unless --delete is given; an interrupted ingest whose leftovers are deleted starts over when rerun. "
        "gc deletes only the lake's own kinds of objects (shards, chunk records, manifests, rejects, leases, "
        "temporary files, claims); anything else is listed as unknown and left alone. It never follows a symbolic "
        "link, skips a dataset whose version records do not parse, and leaves alone every ingest whose lease is "
        "live (a running ingest, or `lake repair`), however old its files.",
    )
    gc.add_argument("dataset", nargs="?", help="one dataset (default: all)")
    gc.add_argument("--delete", action="store_true", help="delete what is listed")
    gc.add_argument(
        "--min-age",
        type=_duration,
        default="1h",
        metavar="AGE",
        help="only objects at least this old, as 90s, 30m, 1h or 2d (default: 1h): a running ingest's files are "
        "protected by its lease whatever their age; this margin covers temporary files of writes in progress",
    )
    urls = commands.add_parser(
        "urls",
        help="print a version's shard URLs, one a line, for webdataset or your own reader",
        description="Print the shard URLs of one split of a lake version. Forms: plain (local paths or s3://), pipe "
        "(`pipe:` commands streaming each shard with this package, credentials from AWS_*), aws (`pipe:aws s3 cp`), "
        "presigned (https URLs readable without credentials until they expire). In Python, "
        "`ingest.lake.open_webdataset(REF, SPLIT)` gives a webdataset pipeline of (key, L, ab) directly.",
        epilog="Example: recolor lake urls photos@3 --split train --form pipe > train-shards.txt",
    )
    urls.add_argument("ref", metavar="NAME[@VERSION]", help="dataset, optionally @version (default: latest)")
    urls.add_argument("--split", choices=SPLITS, default="train")
    urls.add_argument("--form", choices=URL_FORMS, default="plain", help="plain (default), pipe, aws or presigned")
    urls.add_argument(
        "--expires", type=_expiry, default=3600,
        help="presigned URLs' lifetime in seconds, at most 604800 (7 days, S3's limit; default: 3600)",
    )  # fmt: skip
    check = commands.add_parser(
        "check",
        help="check that a version is whole: shards present with their sizes, tables parse, counts agree",
        description="Check one version of a dataset against its record: every shard it lists is in the lake with "
        "its recorded size, the manifest and rejects tables parse (and the manifest has its recorded SHA-256), and "
        "the counts of the record, the shards and the manifest agree. --deep also reads every sample and checks its "
        "CRC-32, in Ray tasks. Prints one line per problem and a summary; exits 1 when anything is wrong.",
        epilog="Damaged shards: `recolor lake repair NAME` writes a new version with them rebuilt.",
    )
    check.add_argument("ref", metavar="NAME[@VERSION]", help="dataset, optionally @version (default: latest)")
    check.add_argument("--deep", action="store_true", help="read every sample and check its CRC-32 (reads it all)")
    repair = commands.add_parser(
        "repair",
        help="rebuild the missing or corrupt shards of a dataset's latest version into a new version",
        description="Check the latest version (deeply, unless --shallow) and write a new version in which each "
        "damaged shard is rebuilt: intact samples are copied, the others made again from their recorded sources "
        "(byte-identical when the source is unchanged). Samples whose source is gone or changed are dropped from "
        "the new version and listed. The damaged version stays as it was.",
    )
    repair.add_argument("dataset", metavar="NAME", help="the dataset to repair (its latest version)")
    repair.add_argument("--shallow", action="store_true", help="only rebuild shards that are missing or mis-sized")
    for sub in (check, repair):
        sub.add_argument("--workers", type=positive_int, help="CPUs of the local Ray instance (default: all)")
        sub.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else local)")
        sub.add_argument("--no-ray", dest="use_ray", action="store_false", help="run in this process")
        sub.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    check.set_defaults(handler=run_lake_check)
    repair.set_defaults(handler=run_lake_repair)
    for sub in (ls, show, gc, urls, check, repair):
        sub.add_argument("--lake", help=f"lake URI (default: ${LAKE_ENV}, else ./lake)")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=run_lake_ls)
    show.set_defaults(handler=run_lake_show)
    gc.set_defaults(handler=run_lake_gc)
    urls.set_defaults(handler=run_lake_urls)


PRESIGN_MAX_S = 604_800  # S3 (SigV4) refuses presigned URLs that live longer than 7 days


def fraction(text: str) -> float:
    """An argparse type: a share in [0, 1] (`--max-bad-fraction -1` or `2` is a slip)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give a share in 0..1, e.g. 0.01") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share in 0..1: e.g. 0.01 for one sample in a hundred")
    return value


def _expiry(text: str) -> int:
    """An argparse type: a presigned URL's lifetime, 1..604800 seconds."""
    value = positive_int(text)
    if value > PRESIGN_MAX_S:
        raise argparse.ArgumentTypeError(f"{value} s is longer than S3's limit for presigned URLs ({PRESIGN_MAX_S} s, "
                                         "7 days)")  # fmt: skip
    return value


def _duration(text: str) -> float:
    """`90`, `90s`, `30m`, `1h`, `2d` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use seconds or 90s, 30m, 1h, 2d") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration cannot be negative")
    return value


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_lake_ls(args) -> int:
    lake = Lake(args.lake)
    lake.check()
    rows, unreadable = [], []
    for dataset in lake.datasets():
        try:
            ref = lake.resolve(dataset)
        except LakeError as e:  # one damaged record hides no other dataset: it is named, the rest listed
            unreadable.append({"dataset": dataset, "error": str(e)})
            continue
        rows.append(
            {
                "dataset": dataset,
                "latest": ref.version,
                "versions": len(lake.versions(dataset)),
                "counts": ref.record["counts"],
                "bytes": sum(ref.record["bytes"].values()),
                "created": ref.record["created"],
            }
        )
    if args.json:
        print(json.dumps({"lake": lake.storage.root_uri, "datasets": rows, "unreadable": unreadable}, indent=2))
        return 1 if unreadable else 0
    for bad in unreadable:
        print(f"recolor: error: dataset {bad['dataset']} cannot be listed: {bad['error']}", file=sys.stderr)
    if not rows:
        if not unreadable:
            print(f"no datasets in {lake.storage.root_uri} (create one with `recolor ingest`)")
        return 1 if unreadable else 0
    print(f"lake {lake.storage.root_uri}")
    print(f"{'dataset':<24} {'latest':>6} {'train':>8} {'val':>7} {'size':>10}  created")
    for row in rows:
        counts = row["counts"]
        print(
            f"{row['dataset']:<24} {'@' + str(row['latest']):>6} {counts.get('train', 0):>8} {counts.get('val', 0):>7} "
            f"{_human(row['bytes']):>10}  {row['created']}"
        )
    return 1 if unreadable else 0


def run_lake_urls(args) -> int:
    lake = Lake(args.lake)
    lake.check()
    ref = lake.resolve(args.ref)
    urls = lake.shard_urls(ref, args.split, args.form, args.expires)
    if args.json:
        print(json.dumps({"ref": ref.ref, "split": args.split, "form": args.form, "urls": urls}, indent=2))
    else:
        print("\n".join(urls))
    return 0


def run_lake_show(args) -> int:
    lake = Lake(args.lake)
    lake.check()
    ref = lake.resolve(args.ref)
    summary = lake.summary(ref)
    rejects = lake.rejects(ref).to_pylist()
    if args.json:
        print(json.dumps(summary | {"rejects": rejects[: args.rejects]}, indent=2))
        return 0
    stats = summary["stats"]
    print(f"{ref.ref}  ({summary['uri']})")
    print(f"  created   {summary['created']}   parent: {summary['parent'] or '-'}")
    print(f"  samples   {summary['size']}x{summary['size']} {summary['resize']}, encoding {summary['encoding']}")
    for split in SPLITS:
        count = summary["counts"].get(split, 0)
        print(
            f"  {split:<6}    {count:>8} samples  {summary['shards'].get(split, 0):>4} shards  "
            f"{_human(summary['bytes'].get(split, 0)):>10}"
        )
    print(
        f"  this ingest: listed {stats['listed']}, unchanged {stats.get('unchanged', 0)}, "
        f"ingested {stats['ingested']}, duplicates {stats['duplicates']}"
    )
    for reason, count in stats["rejected"].items():
        print(f"    rejected {reason:<14} {count}")
    for reject in rejects[: args.rejects]:
        print(f"      {reject['reason']:<12} {reject['source_uri']}  ({reject['detail']})")
    print("  sources:")
    for source in summary["sources"]:
        print(
            f"    {source['kind']:<9} {source['root']}  ({source['ingested']} ingested, ingest {source['ingest_id']})"
        )
    print(f"  versions  {', '.join(map(str, summary['versions']))}")
    print(f"  manifest  sha256 {summary['manifest_sha256'][:16]}...")
    return 0


def _check(args, ref, deep: bool):
    from ingest.fsck import check_version

    return check_version(Lake(args.lake), ref, deep=deep, use_ray=args.use_ray, progress=args.progress and not
                         args.json, ray_address=args.ray_address, workers=args.workers)  # fmt: skip


def run_lake_check(args) -> int:
    lake = Lake(args.lake)
    lake.check()
    ref = lake.resolve(args.ref)
    report = _check(args, ref, args.deep)
    if args.json:
        print(json.dumps({"ref": report.ref, "deep": report.deep, "shards": report.shards, "samples": report.samples,
                          "problems": [vars(p) for p in report.problems]}, indent=2))  # fmt: skip
        return 1 if report.problems else 0
    for problem in report.problems:
        print(problem.line())
    how = "read and checked" if report.deep else "recorded"
    print(f"{report.ref}: {report.shards} shards, {report.samples} samples {how}: ", end="")
    if not report.problems:
        print("whole" + ("" if report.deep else " (--deep also reads every sample)"))
        return 0
    damaged = len(report.damaged_shards)
    advice = f"; `recolor lake repair {ref.dataset}` rebuilds the {damaged} damaged shard(s)" if damaged else ""
    print(f"{len(report.problems)} problem(s){advice}")
    return 1


def run_lake_repair(args) -> int:
    from ingest.fsck import repair
    from ingest.lake import validate_name

    lake = Lake(args.lake)
    lake.check(write=True)
    ref = lake.resolve(validate_name(args.dataset))
    report = _check(args, ref, not args.shallow)
    summary = repair(lake, ref.dataset, report, progress=args.progress and not args.json)
    if args.json:
        print(json.dumps(vars(summary), indent=2))
        return 0
    if summary.version is None:
        print(f"nothing to repair: {ref.ref} is whole" + (" (checked shallowly)" if args.shallow else ""))
        return 0
    for dropped in summary.dropped:
        print(f"dropped   {dropped['key']}  {dropped['source_uri']}  ({dropped['reason']})")
    counts = ", ".join(f"{split} {n}" for split, n in summary.counts.items())
    if summary.rejects == "rebuilt":
        print(f"rejects   the rejects table of {ref.ref} was damaged: made again from its ingest's chunk records")
    elif summary.rejects == "lost":
        print(f"rejects   the rejects table of {ref.ref} was damaged and its chunk records are gone: the new version's "
              f"is empty; the {summary.rejects_lost} refusal(s) stay counted by reason in the version that ingested "
              "them (`recolor lake show NAME@V`)")  # fmt: skip
    print(
        f"repaired {ref.ref} into {ref.dataset}@{summary.version} ({counts}): {len(summary.rebuilt)} shard(s) rebuilt, "
        f"{summary.salvaged} sample(s) copied intact, {summary.remade} made again from their sources, "
        f"{len(summary.dropped)} dropped ({summary.seconds:.1f} s); {ref.ref} is left as it was"
    )
    return 0


def run_lake_gc(args) -> int:
    from ingest import gc
    from ingest.lake import validate_name

    lake = Lake(args.lake)
    lake.check()
    datasets = [validate_name(args.dataset)] if args.dataset else lake.dataset_folders()
    reports = [gc.collect(lake, dataset, args.min_age) for dataset in datasets]
    if args.delete:
        for report in reports:
            gc.delete(lake, report)
    found = [obj for report in reports for obj in report.garbage]
    unknown = [obj for report in reports for obj in report.unknown]
    if args.json:
        listing = [{"key": obj.key, "bytes": obj.size} for obj in found]
        print(json.dumps({
            "lake": lake.storage.root_uri,
            "unreferenced": listing,
            "deleted": args.delete,
            "unknown": [obj.key for obj in unknown],
            "in_use": {f"{r.dataset}/ingests/{i}": lease.describe() for r in reports for i, lease in r.in_use.items()},
            "skipped": {report.dataset: report.skipped for report in reports if report.skipped},
        }, indent=2))  # fmt: skip
        return 0
    for obj in found:
        print(f"{_human(obj.size):>10}  {lake.storage.uri(obj.key)}")
    for obj in unknown:
        print(f"{'unknown':>10}  {lake.storage.uri(obj.key)}  (not of the lake's layout: left alone)")
    for report in reports:
        for ingest_id, lease in report.in_use.items():
            print(f"{'in use':>10}  {lake.storage.uri(f'{report.dataset}/ingests/{ingest_id}')}  "
                  f"(a running ingest holds it: {lease.describe()}; left alone)")  # fmt: skip
        if report.skipped:
            print(f"{'skipped':>10}  {report.dataset}: {report.skipped}")
    total = _human(sum(obj.size for obj in found))
    verb = "deleted" if args.delete else "unreferenced (rerun with --delete to remove)"
    print(f"{len(found)} object(s), {total}, {verb}" + (f"; {len(unknown)} unknown, left alone" if unknown else ""))
    return 0
