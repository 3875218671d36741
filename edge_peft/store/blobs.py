"""Content-addressed blob directory: ``blobs/ab/cdef...`` named by the bytes' sha256 (directories 0700, files 0600)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Iterator

from ..fileio import atomic_write_bytes
from .data_dir import PRIVATE_DIR, PRIVATE_FILE
from .storage import StoreError

SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # always fullmatch
STALE_TEMP_SECONDS = 600
FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def storage_full(exc: OSError) -> StoreError:
    """The 507 answer for a write the disk (or a size limit) refused."""
    return StoreError(507, f"the store cannot write to its data directory ({exc.strerror}): nothing was stored; "
                           "the admin must free disk space, then push again")


class FileBlobStore:
    """Blobs as files; each written to a temp file, fsynced and renamed, so a crash leaves none half-written."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        os.chmod(self.root, PRIVATE_DIR)

    def path(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
            raise StoreError(400, f"{str(sha256)[:70]!r} is not a hex sha256: pass the 64-character digest")
        return self.root / sha256[:2] / sha256[2:]

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Store ``data`` (a no-op if present); StoreError(507), leaving nothing behind, when the disk is full.

        ``sha256``: the digest the caller already computed of exactly these bytes (saves hashing them again)."""
        sha = sha256 or hashlib.sha256(data).hexdigest()
        path = self.path(sha)
        if path.is_file() and path.stat().st_size == len(data):
            return sha
        try:
            path.parent.mkdir(mode=PRIVATE_DIR, exist_ok=True)
            atomic_write_bytes(path, data, mode=PRIVATE_FILE)
        except OSError as exc:
            self._remove_empty_folder(path.parent)
            if exc.errno in FULL_DISK:
                raise storage_full(exc) from None
            raise
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

    def delete(self, sha256: str) -> None:
        """Remove a blob (and its folder when that empties); no error if it is already gone."""
        path = self.path(sha256)
        path.unlink(missing_ok=True)
        self._remove_empty_folder(path.parent)

    def all(self) -> Iterator[str]:
        """The sha256 of every stored blob."""
        for path in self.root.glob("*/*"):
            sha = path.parent.name + path.name
            if SHA256_HEX.fullmatch(sha):
                yield sha

    def remove_partial_writes(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Delete temp files a crash left mid-write (never referenced by metadata); how many.

        Only those older than ``older_than`` seconds unless 0: another process may be writing right now.
        """
        cutoff, removed = time.time() - older_than, 0
        for tmp in self.root.glob("*/.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if not older_than or tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
                    self._remove_empty_folder(tmp.parent)
        return removed

    def _remove_empty_folder(self, folder: Path) -> None:
        with contextlib.suppress(OSError):
            folder.rmdir()
