"""The artifact store's contract, on both backends: a local directory and a real S3 server
(SeaweedFS, credentials enforced)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from controlplane.artifacts import (
    ArtifactStore,
    LocalArtifactStore,
    S3ArtifactStore,
    final_key,
    input_key,
    job_prefix,
    open_artifact_store,
    stage_key,
)
from tests.s3 import SeaweedS3

READS = 50
MIN_WRITES = 20


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return open_artifact_store(tmp_path / "artifacts")
    # through the factory and the AWS_* variables, as a process opens it
    return open_artifact_store(request.getfixturevalue("s3_location"))


def test_the_factory_picks_the_backend_from_the_location(tmp_path: Path) -> None:
    local = open_artifact_store(tmp_path / "a")
    assert isinstance(local, LocalArtifactStore) and local.root == tmp_path / "a"
    s3 = open_artifact_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3ArtifactStore)
    assert (s3.bucket, s3.prefix, s3.location) == ("bucket", "some/prefix",
                                                    "s3://bucket/some/prefix")
    with pytest.raises(ValueError, match="s3://BUCKET"):
        open_artifact_store("s3:///nobucket")


def test_an_image_round_trips_with_its_png_metadata(store: ArtifactStore) -> None:
    image = Image.new("RGB", (16, 8), (200, 10, 30))
    store.save(final_key("j_1", 0), image, {"laneway:prompt": "a lighthouse"})
    loaded = store.load(final_key("j_1", 0))
    assert loaded.size == (16, 8) and loaded.getpixel((3, 3)) == (200, 10, 30)
    assert loaded.info["laneway:prompt"] == "a lighthouse"


def test_bytes_exists_and_delete(store: ArtifactStore) -> None:
    key = input_key("j_2", "mask")
    assert not store.exists(key)
    with pytest.raises(FileNotFoundError):
        store.get(key)
    store.put(key, b"first")
    store.put(key, b"second")  # replaces
    assert store.exists(key) and store.get(key) == b"second"
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # already gone: no error


def test_prefix_listing_and_delete_touch_only_that_job(store: ArtifactStore) -> None:
    mine = [final_key("j_1", 0), final_key("j_1", 1), stage_key("j_1", 0, 0),
            input_key("j_1", "image")]
    theirs = [final_key("j_12", 0), final_key("j_2", 0)]
    for key in mine + theirs:
        store.put(key, key.encode())
    assert store.keys(job_prefix("j_1")) == sorted(mine)
    assert store.delete_prefix(job_prefix("j_1")) == len(mine)
    assert store.keys(job_prefix("j_1")) == []
    assert not any(store.exists(key) for key in mine)
    assert all(store.get(key) == key.encode() for key in theirs)
    assert store.delete_prefix(job_prefix("j_1")) == 0


async def test_open_gives_the_size_then_the_bytes(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 4000  # several chunks
    store.put(final_key("j_3", 0), data)
    download = await store.open(final_key("j_3", 0))
    assert download.size == len(data)
    assert b"".join([chunk async for chunk in download.chunks]) == data
    with pytest.raises(FileNotFoundError):  # at open, before any chunk
        await store.open(final_key("j_3", 1))


def test_no_partial_object_is_ever_visible(store: ArtifactStore) -> None:
    """While one thread rewrites a key with two large payloads, every read of it is one
    of them whole."""
    key = final_key("j_4", 0)
    first, second = b"a" * 1_000_000, b"b" * 1_000_000
    store.put(key, first)
    seen: list[bytes] = []
    writes = 0
    stop = threading.Event()

    def write() -> None:
        nonlocal writes
        while not stop.is_set():
            store.put(key, second if writes % 2 == 0 else first)
            writes += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while len(seen) < READS or writes < MIN_WRITES:  # reads overlapping many writes
            seen.append(store.get(key))
    finally:
        stop.set()
        writer.join()
    assert set(seen) <= {first, second}
    assert store.keys(job_prefix("j_4")) == [key]  # no temporary name is listed


@pytest.mark.parametrize("key", ["", "/abs/0.png", "../up/0.png", "a//b.png", "j_1/.tmp",
                                 "a\\b.png"])
def test_keys_outside_the_layout_are_refused(tmp_path: Path, key: str) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="not an artifact key"):
        store.put(key, b"x")
    with pytest.raises(ValueError, match="not a job id"):
        final_key("../j", 0)


def test_a_presigned_url_reads_the_object_without_credentials(
        seaweed: SeaweedS3, s3_location: str) -> None:
    store = open_artifact_store(s3_location)
    store.put(final_key("j_5", 0), b"png bytes")
    url = store.presigned_url(final_key("j_5", 0), expires_s=60)
    assert httpx.get(url).content == b"png bytes"
    # the server checks the signature: a tampered one, or none, is refused
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    assert httpx.get(url.split("?")[0]).status_code == 403


def test_the_s3_server_refuses_a_wrong_secret(seaweed: SeaweedS3) -> None:
    wrong = S3ArtifactStore(seaweed.bucket, "wrong", config={  # type: ignore[arg-type]
        **seaweed.config, "secret_access_key": "not-the-secret"})
    with pytest.raises(Exception, match="403|SignatureDoesNotMatch|privileges"):
        wrong.put(final_key("j_6", 0), b"x")


def test_a_local_store_cannot_presign(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError):
        LocalArtifactStore(tmp_path).presigned_url(final_key("j_7", 0), expires_s=60)
