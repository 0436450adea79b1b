"""The one way fedtt writes outputs: atomically (a reader, or a resumed run, never sees half a file or a half-written
directory), and never over an earlier run unless told to."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CHECKPOINT = "checkpoint.safetensors"
RUN_STATE = (CHECKPOINT, "results.json", "results.md")  # a directory holding these is a run


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named temporary file in the same directory, flushed to disk,
    and an atomic rename; on any failure (a full disk) the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def replace_dir(path: str | Path, write) -> None:
    """Build a directory with ``write(tmp_dir)`` beside ``path``, then swap it in: a kill leaves the old or the new
    directory, never half of one."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """A directory for a new run: refused if it holds one (unless ``overwrite``); an overwritten run's state goes,
    so the new run is never resumed from or mistaken for the old one."""
    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run (results.json); choose another --out, pass "
                              "--overwrite to replace it or --resume to continue it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old_state in RUN_STATE:
        (out_dir / old_state).unlink(missing_ok=True)
    return out_dir


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
