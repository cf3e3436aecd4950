"""Writing and hashing output files: every output is written atomically and fsynced, so a crash,
``kill -9`` or full disk never leaves half a file where a reader (DVC, the next stage) looks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def md5_of(path: Path) -> str:
    """The file's MD5, hex (read in 1 MiB blocks)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write via a temp file in the same directory + fsync + rename: readers never see half a
    file, and the previous file stays whole if writing fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file permissions
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
