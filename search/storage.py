"""Check that Ray Tune's storage path is reachable from every node of the Ray cluster.

Each trial writes its checkpoints and results to the storage path from the node it runs
on, and the driver reads them back at the end. A URI such as s3://bucket/prefix names the
same place from every node. A local path does only when it lies on a file system mounted
at that path on every node (NFS, EFS, or the one disk of a single machine).

For a local path on a cluster of more than one alive node, the driver writes a marker file
with a random token into the folder. A task pinned to each alive node must then read the
same token back. If a node cannot, the path is node-local, which is an error.

RemotePath gives a URI the parts of pathlib.Path that the search uses (joining, reading,
writing, listing) through pyarrow.fs, as Ray Tune does, so the experiment folder can be a
local Path or a RemotePath. storage_location returns the one that a string names.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

MARKER_PREFIX = ".storage-check-"
CHECK_TIMEOUT_S = 120.0  # a task on a busy node may first have to start a worker process
# On NFS with attribute caching, a new file can appear on other nodes a moment after the
# driver wrote it. The task retries the read for this long before it reports the file missing.
MARKER_WAIT_S = 5.0

SHARED_STORAGE_ADVICE = (
    "On a multi-node cluster, use a folder of a shared file system mounted at the same path on "
    "every node (for example NFS or EFS), or a cloud storage URI such as s3://BUCKET/ray-results."
)


class StorageError(ValueError):
    """The storage path cannot be reached from every node of the cluster."""


def is_uri(storage_path: str | os.PathLike | RemotePath) -> bool:
    """Return whether storage_path is a URI of a remote file system (s3://, gs://, ...).

    A file:// URI and a plain path are local paths.
    """
    text = str(storage_path)
    scheme = urlsplit(text).scheme
    return "://" in text and len(scheme) > 1 and scheme != "file"


def local_path(storage_path: str | os.PathLike) -> Path:
    """Return the folder named by a plain path or a file:// URI."""
    text = os.fspath(storage_path)
    if text.startswith("file://"):
        text = urlsplit(text).path
    return Path(text).expanduser()


def storage_location(value: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """Return a RemotePath for a URI of a remote file system, else the local Path."""
    if isinstance(value, (Path, RemotePath)):
        return value
    return RemotePath(str(value)) if is_uri(value) else local_path(value)


def location_on(filesystem: pafs.FileSystem, fs_path: str) -> Path | RemotePath:
    """Return fs_path on a pyarrow filesystem, such as a trial folder that Ray Tune reports, as a location."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Path(fs_path)
    scheme = {"gcs": "gs"}.get(filesystem.type_name, filesystem.type_name)
    return RemotePath(f"{scheme}://{fs_path}", filesystem=filesystem)


def append_line(path: Path | RemotePath, line: str) -> None:
    """Append one line of text to a file, creating the file and its folder when missing.

    Object stores cannot append, so a RemotePath file is read and written back whole. That
    is safe only while one process at a time writes the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(path, Path):
        with open(path, "a") as file:
            file.write(line + "\n")
        return
    existing = path.read_text() if path.is_file() else ""
    path.write_text(existing + line + "\n")


def remove_tree(path: Path | RemotePath) -> None:
    """Delete a folder and everything in it; a missing folder is not an error."""
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.is_dir():
        path.filesystem.delete_dir(path.fs_path)


class RemotePath:
    """A file or folder behind a URI such as s3://bucket/prefix, with the pathlib.Path methods the search uses.

    The pyarrow filesystem is created from the URI on first use, as Ray Tune creates it, so
    credentials and endpoints come from the same settings. For S3 these are the AWS
    environment variables, ~/.aws, the instance profile and URI query parameters such as
    ?endpoint_override=HOST:PORT. A query string stays at the end of every joined URI.
    """

    def __init__(self, uri: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        parts = urlsplit(uri)
        if not parts.scheme or not parts.netloc:
            raise ValueError(f"invalid storage URI {uri!r}; expected SCHEME://BUCKET/PATH")
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._key = parts.path.strip("/")
        self._query = parts.query
        self._filesystem = filesystem

    def _with_key(self, key: str) -> RemotePath:
        other = RemotePath(str(self), filesystem=self._filesystem)
        other._key = key.strip("/")
        return other

    def __str__(self) -> str:
        uri = f"{self._scheme}://{self._netloc}/{self._key}".rstrip("/")
        return f"{uri}?{self._query}" if self._query else uri

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str | os.PathLike) -> RemotePath:
        return self._with_key(posixpath.join(self._key, os.fspath(name)))

    @property
    def name(self) -> str:
        return posixpath.basename(self._key)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> RemotePath:
        return self._with_key(posixpath.dirname(self._key))

    @property
    def filesystem(self) -> pafs.FileSystem:
        if self._filesystem is None:
            self._filesystem, _ = pafs.FileSystem.from_uri(str(self))
        return self._filesystem

    @property
    def fs_path(self) -> str:
        """The path of this location on self.filesystem: the bucket and key for S3 and GCS."""
        return f"{self._netloc}/{self._key}".rstrip("/")

    def resolve(self) -> RemotePath:
        return self

    def as_uri(self) -> str:
        return str(self)

    def _file_type(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.fs_path).type

    def exists(self) -> bool:
        return self._file_type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._file_type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._file_type() == pafs.FileType.Directory

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if not exist_ok and self.exists():
            raise FileExistsError(str(self))
        self.filesystem.create_dir(self.fs_path, recursive=parents)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.fs_path) as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        with self.filesystem.open_output_stream(self.fs_path) as stream:
            stream.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.filesystem.delete_file(self.fs_path)

    def iterdir(self) -> list[RemotePath]:
        selector = pafs.FileSelector(self.fs_path, allow_not_found=True)
        return [self / posixpath.basename(info.path) for info in self.filesystem.get_file_info(selector)]

    def glob(self, pattern: str) -> list[RemotePath]:
        """Return the entries of this folder whose names match pattern; unlike Path.glob, one level only."""
        if "/" in pattern or "**" in pattern:
            raise ValueError(f"RemotePath.glob matches names in one folder, not {pattern!r}")
        return [child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern)]


def check_storage_path(storage_path: str | os.PathLike, *, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise StorageError unless every alive node of the connected Ray cluster reaches storage_path.

    A remote URI is accepted without a check. A local path is accepted on a one-node
    cluster, and on more nodes only when a marker file that this process writes there is
    readable from each alive node. Ray must already be initialised. Nodes that join after
    the check, for example ones the autoscaler adds later, are not checked.
    """
    if is_uri(storage_path):
        return
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return

    folder = local_path(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    marker = folder / f"{MARKER_PREFIX}{token}"
    marker.write_text(token)
    try:
        missing = _nodes_without_marker(nodes, marker, token, timeout_s)
    finally:
        marker.unlink(missing_ok=True)

    if missing:
        raise StorageError(
            f"storage path {folder} is not shared by all {len(nodes)} nodes of the Ray cluster: "
            f"{'; '.join(missing)}. Trials write their checkpoints there from the node they run on. "
            + SHARED_STORAGE_ADVICE
        )
    logger.info("storage path %s is readable from all %d nodes", folder, len(nodes))


def _nodes_without_marker(nodes: list[dict], marker: Path, token: str, timeout_s: float) -> list[str]:
    """Read the marker from each node and return a description of every node that failed."""

    # Defined here, not at module level, so that Ray ships the function by value and the
    # nodes need not be able to import this module.
    def read_marker(path: str, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return Path(path).read_text()
            except OSError:
                if time.monotonic() >= deadline:
                    return None
            time.sleep(0.5)

    remote_read = ray.remote(num_cpus=0, max_retries=0)(read_marker)
    pending = {}
    for node in nodes:
        strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        ref = remote_read.options(scheduling_strategy=strategy).remote(str(marker), MARKER_WAIT_S)
        pending[ref] = node

    ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    problems = [f"{_describe(pending[ref])} did not answer within {timeout_s:.0f} s" for ref in not_ready]
    for ref in ready:
        node = pending[ref]
        try:
            content = ray.get(ref)
        except ray.exceptions.RayError as err:
            problems.append(f"{_describe(node)} could not run the check ({type(err).__name__}: {err})")
            continue
        if content is None:
            problems.append(f"{_describe(node)} does not see the file {marker} that the driver wrote")
        elif content != token:
            problems.append(f"{_describe(node)} sees a different file at {marker}")
    for ref in not_ready:
        ray.cancel(ref, force=True)
    return problems


def _describe(node: dict) -> str:
    return f"node {node['NodeManagerAddress']} (id {node['NodeID'][:12]})"
