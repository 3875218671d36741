"""Content-addressed blob directory: ``blobs/ab/cdef...`` named by the bytes' sha256."""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

from ..fileio import atomic_write_bytes
from .storage import StoreError

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
STALE_TEMP_SECONDS = 600


class FileBlobStore:
    """Blobs as files; each written to a temp file, fsynced and renamed, so a crash leaves none half-written."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_partial_writes()

    def path(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise StoreError(400, f"{sha256!r} is not a hex sha256: pass the 64-character digest")
        return self.root / sha256[:2] / sha256[2:]

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.path(sha)
        if not (path.is_file() and path.stat().st_size == len(data)):
            atomic_write_bytes(path, data)
        return sha

    def get(self, sha256: str) -> bytes:
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise StoreError(500, f"blob {sha256[:12]} is missing from {self.root}: restore the blob directory from backup") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(500, f"blob {sha256[:12]} in {self.root} is corrupt: restore it from backup")
        return data

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def remove_partial_writes(self) -> None:
        """Delete temp files a crash left mid-write (never referenced by metadata).

        Only stale ones: another process (the server, a local ``store aggregate``) may be writing right now.
        """
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.root.glob("*/.*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                pass
