"""Files written whole or not at all, and their checksums.

Every file pysparse writes for a user (artifacts, exports, reports) goes through a temporary name
beside the target and is renamed into place, so a failure or an interrupt never leaves a partial
file where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed to it when the block ends without error and
    removed otherwise."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # (the target's suffix kept: some writers check it, torch.export.save for .pt2)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through ``atomic_path``, keeping an existing file's mode."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, mode)


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
