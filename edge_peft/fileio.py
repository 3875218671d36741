"""Atomic file and directory writes: nothing partial is ever visible under the final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsync, rename.

    The file gets ``mode`` (default: 0o666 less the umask), already while it is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; on success it replaces ``final`` in one rename.

    On any exception the temp directory is removed and ``final`` is left as it was. The temp directory's name
    carries the writer's pid, so the ones a killed writer left (out of memory, SIGKILL) are removed by the next.
    """
    final = Path(final)
    if final.exists() and not overwrite and any(final.iterdir()):
        from .errors import UserError

        raise UserError(f"{final} exists and is not empty: choose another --out or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            crash_point("between-renames")  # the crash tests' hook: old and new both complete, neither in place
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_abandoned(final: Path) -> None:
    """Remove the temp directories of ``final`` whose writer process no longer exists."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)\.[a-z0-9_]+\.tmp")  # what mkdtemp makes below
    for tmp in final.parent.iterdir():
        match = pattern.fullmatch(tmp.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


CRASH_AT = "EDGE_PEFT_CRASH_AT"


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL here when ``$EDGE_PEFT_CRASH_AT`` names this point (crash tests)."""
    if os.environ.get(CRASH_AT) == name:
        os.kill(os.getpid(), 9)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
