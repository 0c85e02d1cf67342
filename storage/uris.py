"""Local paths and object-store URIs (s3://, gs://, hdfs://, ...) through pyarrow's file systems.

A URI carries its file-system options in the query string, e.g.
`s3://frames/2026?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1`; every file
listed under it keeps that query, so a worker can open it with nothing else to go on.
Credentials come from the usual environment (AWS_ACCESS_KEY_ID, ...), never from the URI.
"""

from functools import lru_cache
from urllib.parse import urlsplit

import pyarrow.fs as pafs


def is_uri(location) -> bool:
    return "://" in str(location)


@lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str, query: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))
    return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (file system, path inside it); file systems are cached per bucket and options."""
    parts = urlsplit(uri)
    return _filesystem(parts.scheme, parts.netloc, parts.query), f"{parts.netloc}{parts.path}".rstrip("/")


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def list_files(uri: str, suffixes: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Files below `uri` whose names end in one of `suffixes` (case-insensitive), sorted:
    (relative path, URI of the file with the root's options, "<bytes>:<mtime_ns>")."""
    parts = urlsplit(uri)
    fs, root = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    query = f"?{parts.query}" if parts.query else ""
    files = []
    for info in infos:
        if info.type == pafs.FileType.File and info.path.lower().endswith(suffixes):
            rel = info.path[len(root) :].lstrip("/")
            mtime = info.mtime_ns if info.mtime_ns is not None else "-"
            files.append((rel, f"{parts.scheme}://{info.path}{query}", f"{info.size}:{mtime}"))
    return sorted(files)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound
