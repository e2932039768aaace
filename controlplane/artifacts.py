"""The artifact store: request images, stage outputs and final images, by key.

Keys are the same whatever the backend: ``JOB_ID/input/{image,mask}.png`` for request
images, ``JOB_ID/stage-K/I.png`` for intermediate stage outputs and ``JOB_ID/I.png`` for the
job's final images (:func:`input_key`, :func:`stage_key`, :func:`final_key`); everything of
a job lies under :func:`job_prefix`, so retention deletes one prefix.

One interface, :class:`ArtifactStore`, two backends, chosen from ``LANEWAY_ARTIFACTS`` by
:func:`open_artifact_store`:

- :class:`LocalArtifactStore` — a directory (``var/artifacts``); a write goes to a hidden
  temporary file in the same folder and is renamed, so a reader never sees half a file;
- :class:`S3ArtifactStore` — ``s3://BUCKET/PREFIX`` on any S3-compatible server, through
  obstore, configured by the standard ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION`` variables; an object is one PUT, which S3
  makes visible whole or not at all.

::

    store = open_artifact_store(settings.artifacts)
    store.save(final_key(job.id, 0), image, {"laneway:prompt": job.request.prompt})
    image = store.load(final_key(job.id, 0))      # FileNotFoundError when it is not there
    download = await store.open(final_key(job.id, 0))   # size, then chunks as they come
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import obstore
from obstore.store import S3Store
from PIL import Image, PngImagePlugin

if TYPE_CHECKING:
    from obstore import GetResult
    from obstore.store import S3Config

S3_SCHEME = "s3://"
#: bytes per chunk of a streamed download
CHUNK_BYTES = 256 * 1024
#: an S3 call is retried this often, within this long, before it fails: a store that is
#: down fails the request within seconds instead of obstore's default of minutes
S3_MAX_RETRIES = 3
S3_RETRY_TIMEOUT_S = 10.0
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0


def job_prefix(job_id: str) -> str:
    """The prefix every artifact of the job lies under (``JOB_ID/``)."""
    if not job_id or "/" in job_id or job_id.startswith("."):
        raise ValueError(f"not a job id: {job_id!r}")
    return f"{job_id}/"


def input_key(job_id: str, name: str) -> str:
    """A request image (``image`` or ``mask``) of the job."""
    return f"{job_prefix(job_id)}input/{name}.png"


def stage_key(job_id: str, stage: int, index: int) -> str:
    """Output ``index`` of a stage that is not the job's last."""
    return f"{job_prefix(job_id)}stage-{stage}/{index}.png"


def final_key(job_id: str, index: int) -> str:
    """The job's final image ``index`` (what ``GET /v1/jobs/{id}/images/{index}`` serves)."""
    return f"{job_prefix(job_id)}{index}.png"


def check_key(key: str) -> str:
    """``key`` if it is a relative name of parts that are neither empty nor hidden."""
    parts = key.split("/")
    if not key or "\\" in key or any(not p or p.startswith(".") for p in parts):
        raise ValueError(f"not an artifact key: {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a folder of keys (``JOB_ID/``): a key followed by ``/``."""
    if not prefix.endswith("/"):
        raise ValueError(f"an artifact prefix ends with '/' (got {prefix!r})")
    check_key(prefix[:-1])
    return prefix


def encode_png(image: Image.Image, metadata: dict[str, str] | None = None) -> bytes:
    """``image`` as PNG bytes, with ``metadata`` as its text chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.copy()


@dataclass(frozen=True)
class Download:
    """An artifact being read: its size, known before the first byte, and its chunks."""

    size: int
    chunks: AsyncIterator[bytes]


class ArtifactStore(ABC):
    """Bytes by key. Reads of a key that is not there raise FileNotFoundError."""

    #: where the store is, for logs: a directory or ``s3://bucket/prefix``
    location: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key``, replacing what was there; never visible in part."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a key that is not there is no error."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (a folder such as ``JOB_ID/``), sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under ``prefix``; how many there were."""

    @abstractmethod
    async def open(self, key: str) -> Download:
        """Start reading ``key`` (FileNotFoundError now, not at the first chunk)."""

    def presigned_url(self, key: str, *, expires_s: int) -> str:
        """A URL that reads ``key`` without credentials for ``expires_s`` seconds."""
        raise NotImplementedError(f"{type(self).__name__} cannot presign URLs")

    def save(self, key: str, image: Image.Image, metadata: dict[str, str] | None = None
             ) -> None:
        """Write ``image`` as PNG, with ``metadata`` in its text chunks."""
        self.put(key, encode_png(image, metadata))

    def load(self, key: str) -> Image.Image:
        return decode_image(self.get(key))


class LocalArtifactStore(ArtifactStore):
    """Keys are files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # hidden (no key has a part starting with '.') and unique to this write, so neither
        # a reader nor a concurrent writer of the same key ever sees it
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        folder = self.root / check_prefix(prefix)
        if not folder.is_dir():
            return []
        return sorted(path.relative_to(self.root).as_posix() for path in folder.rglob("*")
                      if path.is_file() and not path.name.startswith("."))

    def delete_prefix(self, prefix: str) -> int:
        found = self.keys(prefix)
        shutil.rmtree(self.root / prefix, ignore_errors=True)
        return len(found)

    async def open(self, key: str) -> Download:
        path = self._path(key)
        handle = await asyncio.to_thread(path.open, "rb")
        size = os.fstat(handle.fileno()).st_size
        return Download(size, _file_chunks(handle))


async def _file_chunks(handle: io.BufferedReader) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield chunk
    finally:
        handle.close()


class S3ArtifactStore(ArtifactStore):
    """Keys are objects under ``prefix`` in ``bucket``.

    The endpoint, keys and region come from the standard ``AWS_*`` variables (obstore
    reads them, with the rest of its ``AWS_*`` configuration: session tokens, web
    identity, ...); ``config`` overrides them.
    """

    def __init__(self, bucket: str, prefix: str = "", *, config: S3Config | None = None
                 ) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = f"{S3_SCHEME}{bucket}/{self.prefix}".rstrip("/")
        self.store = S3Store(
            bucket, prefix=self.prefix or None, config=config,
            # plain http only where AWS_ENDPOINT_URL says http:// (a server on the
            # cluster's network, or a test's): the endpoint's scheme is the operator's choice
            client_options={"allow_http": True,
                            "connect_timeout": timedelta(seconds=S3_CONNECT_TIMEOUT_S),
                            "timeout": timedelta(seconds=S3_REQUEST_TIMEOUT_S)},
            retry_config={"max_retries": S3_MAX_RETRIES,
                          "retry_timeout": timedelta(seconds=S3_RETRY_TIMEOUT_S),
                          "backoff": {"init_backoff": timedelta(milliseconds=100),
                                      "max_backoff": timedelta(seconds=2), "base": 2}})

    def put(self, key: str, data: bytes) -> None:
        obstore.put(self.store, check_key(key), data)

    def get(self, key: str) -> bytes:
        return bytes(obstore.get(self.store, check_key(key)).bytes())

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self.store, check_key(key))
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        obstore.delete(self.store, check_key(key))

    def keys(self, prefix: str) -> list[str]:
        listed = obstore.list(self.store, prefix=check_prefix(prefix))
        return sorted(meta["path"] for batch in listed for meta in batch)

    def delete_prefix(self, prefix: str) -> int:
        found = self.keys(prefix)
        if found:
            obstore.delete(self.store, found)  # batched into bulk deletes by obstore
        return len(found)

    async def open(self, key: str) -> Download:
        result = await obstore.get_async(self.store, check_key(key))
        return Download(result.meta["size"], _object_chunks(result))

    def presigned_url(self, key: str, *, expires_s: int) -> str:
        return obstore.sign(self.store, "GET", check_key(key), timedelta(seconds=expires_s))


async def _object_chunks(result: GetResult) -> AsyncIterator[bytes]:
    async for chunk in result.stream(min_chunk_size=CHUNK_BYTES):
        yield bytes(chunk)


def parse_s3_location(location: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://BUCKET[/PREFIX]``."""
    bucket, _, prefix = location.removeprefix(S3_SCHEME).partition("/")
    if not location.startswith(S3_SCHEME) or not bucket:
        raise ValueError(f"expected s3://BUCKET[/PREFIX] (got {location!r})")
    return bucket, prefix.strip("/")


def open_artifact_store(location: str | Path) -> ArtifactStore:
    """The store ``LANEWAY_ARTIFACTS`` names: ``s3://BUCKET[/PREFIX]``, else a directory."""
    text = os.fspath(location)
    if text.startswith(S3_SCHEME):
        return S3ArtifactStore(*parse_s3_location(text))
    return LocalArtifactStore(Path(text))
