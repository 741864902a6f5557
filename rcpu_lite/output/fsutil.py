"""Durable file operations, one of each: an atomic write and a publish (the rename that makes an output appear)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> int:
    """write(temporary path: `path` + `suffix`), fsync, rename over `path`, fsync the folder; return the size in
    bytes.

    A crash at any moment leaves either the old file or the new one, never half of one; a failed write
    leaves no temporary file behind.
    """
    tmp = path.with_name(path.name + suffix)
    try:
        write(tmp)
        fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path.stat().st_size


def write_json(path: Path, data: dict) -> int:
    """Atomically write `data` as indented JSON with a final newline."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def publish(work: Path, out: Path, remove_last: str | None = None) -> None:
    """Make every file in `work` durable, then let it replace `out` by renames.

    An existing `out` is moved aside first and deleted only once `work` has taken its name, so `out` is
    missing only between two renames. `remove_last` names a file removed from the published folder at the very
    end (the resume manifest: a crash before that leaves a complete folder that --resume can finish).
    """
    for item in work.iterdir():
        if item.is_file():
            fsync_file(item)
    fsync_dir(work)
    aside = work.with_name(work.name + ".old") if out.exists() else None
    if aside is not None:
        if aside.exists():
            shutil.rmtree(aside)
        out.rename(aside)
    try:
        work.rename(out)
    except BaseException:
        if aside is not None:
            aside.rename(out)
        raise
    if remove_last:
        (out / remove_last).unlink()
    fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside)
