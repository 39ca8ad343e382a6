"""File helpers shared by checkpoints, weights and datasets: atomic writes and verified downloads."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> Path:
    """Call ``write_fn(tmp_path)``, fsync the result and rename it onto ``path`` only once it succeeded.

    A crash at any point leaves either the old file or the complete new one at ``path``, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the file the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def file_digest(path: str | os.PathLike, algo: str = "md5") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, target: str | os.PathLike, digest: str | None = None, algo: str = "sha256") -> Path:
    """Fetch ``url`` to ``target`` atomically; with ``digest`` the bytes must hash to it (``algo``) or nothing is kept.

    ``file://`` URLs work too (used by the tests, which never touch the network).
    """

    def fetch(tmp: str) -> None:
        h = hashlib.new(algo)
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
        if digest and h.hexdigest() != digest:
            raise OSError(f"checksum mismatch for {url}: expected {algo} {digest}, got {h.hexdigest()}")

    return atomic_write(target, fetch)
