"""The lake from a user's own code: `recolor lake urls` and `ingest.lake.open_webdataset` read the same samples
as this project's loader, from a local lake and from S3 (plain, `pipe:` and presigned URLs)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ingest.lab import lab8_to_network
from ingest.lake import open_webdataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lake(tmp_path_factory, photo_writer, cli_runner):
    root = tmp_path_factory.mktemp("wds")
    photo_writer(root / "photos", range(24), width=80, height=64)
    result = cli_runner("ingest", "folder", root / "photos", "--dataset", "d", "--no-ray", "--size", "32",
                        "--shard-size", "7", "--no-progress", cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "lake"


def project_samples(lake_uri: str, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What this project's loader reads: every sample of the split, in shard order, normalized."""
    from pipeline.data.epochs import plan_validation
    from pipeline.data.plan import resolve_data
    from pipeline.data.reading import decode_sample, read_segments

    plan = resolve_data(["d"], lake_uri)
    shards = plan.train if split == "train" else plan.val
    samples = {}
    for _, key, data in read_segments(plan_validation(shards, 0, 1)):
        samples[key] = lab8_to_network(decode_sample(data, plan.size))
    return samples


def assert_same(yielded, expected) -> None:
    keys = [key for key, _, _ in yielded]
    assert keys == list(expected), (keys[:3], list(expected)[:3])
    for key, light, ab in yielded:
        assert light.dtype == np.float32 and light.shape[0] == 1 and ab.shape[0] == 2
        np.testing.assert_array_equal(light, expected[key][0])
        np.testing.assert_array_equal(ab, expected[key][1])


def test_open_webdataset_yields_the_projects_samples(lake) -> None:
    for split in ("train", "val"):
        expected = project_samples(str(lake), split)
        assert expected
        assert_same(list(open_webdataset("d", split, lake=str(lake))), expected)


def test_lake_urls_prints_paths_and_pipe_commands_webdataset_reads(lake, cli_runner) -> None:
    import webdataset as wds

    plain = cli_runner("lake", "urls", "d@1", "--split", "train", "--lake", lake, cwd=lake.parent)
    assert plain.returncode == 0, plain.stderr
    paths = plain.stdout.split()
    assert len(paths) >= 2 and all(path.endswith(".tar") and path.startswith(str(lake)) for path in paths)
    piped = cli_runner("lake", "urls", "d", "--form", "pipe", "--lake", lake, cwd=lake.parent)
    urls = piped.stdout.splitlines()
    assert len(urls) == len(paths) and all(url.startswith("pipe:") for url in urls)
    keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert keys == list(project_samples(str(lake), "train"))


def test_open_webdataset_reads_an_s3_lake_and_presigned_urls(lake, s3_env, cli_runner) -> None:
    import webdataset as wds

    shutil.copytree(lake, s3_env.bucket_dir / "lake")
    lake_uri = f"s3://{s3_env.bucket}/lake"
    expected = project_samples(lake_uri, "val")
    assert_same(list(open_webdataset("d", "val", lake=lake_uri)), expected)
    if shutil.which("curl"):  # webdataset opens https URLs with curl
        result = cli_runner("lake", "urls", "d", "--split", "val", "--form", "presigned", "--lake", lake_uri,
                            cwd=lake.parent, env=s3_env.env)  # fmt: skip
        urls = result.stdout.splitlines()
        assert urls and all("X-Amz-Signature=" in url for url in urls), result.stderr
        keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
        assert keys == list(expected)


def test_a_changed_sample_raises_naming_its_key_or_is_skipped_on_request(lake, tmp_path) -> None:
    import tarfile

    import webdataset as wds

    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    first = sorted(copy.rglob("train-*.tar"))[0]  # a train shard: which chunks have one depends on the shard order
    with tarfile.open(first) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".lab.npy"))
    with open(first, "r+b") as shard:  # 32 bytes inverted: changed whatever they were (0xff-saturated pixels too)
        shard.seek(member.offset_data + member.size - 64)
        inverted = bytes(byte ^ 0xFF for byte in shard.read(32))
        shard.seek(member.offset_data + member.size - 64)
        shard.write(inverted)
    key = member.name.split(".")[0]
    with pytest.raises(ValueError, match=f"sample {key} of d@1: missing or changed since ingest"):
        list(open_webdataset("d", "train", lake=str(copy)))
    with pytest.warns(UserWarning, match=f"sample {key} of d@1: missing or changed"):
        kept = [k for k, _, _ in open_webdataset("d", "train", lake=str(copy), handler=wds.warn_and_continue)]
    assert key not in kept and len(kept) == len(project_samples(str(lake), "train")) - 1
