"""Paths on any pyarrow filesystem, and writes that are atomic on all of them.

A file that exists under its final name is complete: bytes go to a temporary name first, are
flushed (and fsync'ed on local disks), then renamed. Object stores (s3://, gs://) publish an
object only when its upload completes, so the same protocol holds there.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # path inside fs, no scheme
    options: str = ""  # the URI's query (e.g. endpoint_override=...), kept so uri() round-trips

    @classmethod
    def parse(cls, uri: str) -> "Location":
        if "://" not in uri:
            return cls(pafs.LocalFileSystem(), os.path.abspath(uri))
        fs, path = pafs.FileSystem.from_uri(uri)
        return cls(fs, path, uri.split("?", 1)[1] if "?" in uri else "")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, "/".join([self.path.rstrip("/"), *parts]), self.options)

    def uri(self) -> str:
        if self.is_local:
            return self.path
        return f"{self.fs.type_name}://{self.path}" + (f"?{self.options}" if self.options else "")

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size

    def sha256(self) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def delete(self) -> None:
        if self.exists():
            self.fs.delete_file(self.path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(loc: Location, data: bytes) -> str:
    """Write ``data`` to ``loc`` so that it either fully exists or not at all; returns its sha256."""
    parent = loc.path.rsplit("/", 1)[0]
    tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
    if loc.is_local:
        os.makedirs(parent, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, loc.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(parent)
    else:
        loc.fs.create_dir(parent, recursive=True)
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)
        loc.fs.move(tmp, loc.path)
    return hashlib.sha256(data).hexdigest()
