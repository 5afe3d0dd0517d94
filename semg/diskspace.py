"""Free space on the disks the platform writes to, so a filling disk is seen before recordings are lost.

When the embedded database's disk is full, PostgreSQL refuses every insert; the UDP server then keeps what
arrives in its spool, on the same disk, and drops packets once that cannot be written either. A warning while
there is still room gives people time to free space or move the state directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from semg.config import Settings

MB = 1 << 20


@dataclass(frozen=True)
class Disk:
    """One filesystem the platform writes to: the paths on it, its space in bytes."""
    paths: tuple[Path, ...]
    free: int   # available to this (unprivileged) process, as df's "Avail"
    total: int

    def low(self, min_free_mb: int) -> bool:
        return min_free_mb > 0 and self.free < min_free_mb * MB


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (a directory not made yet will be made on that disk)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_paths(s: Settings) -> list[Path]:
    """Where this install writes: the state directory, the parts of it that may be mounted elsewhere, and the
    automatic backups' directory."""
    paths = [s.state_dir, s.video_dir, s.state_dir / "spool"]
    if s.embedded_postgres:
        paths.append(s.pg_data_dir)
    if s.backup_dir is not None:
        paths.append(s.backup_dir)
    return paths


def disks(paths: list[Path]) -> list[Disk]:
    """The filesystems holding `paths` (each once, in the order first met)."""
    found: dict[int, tuple[list[Path], tuple[int, int, int]]] = {}
    for path in paths:
        existing = _existing(path)
        dev = os.stat(existing).st_dev
        if dev in found:
            found[dev][0].append(path)
        else:
            found[dev] = ([path], shutil.disk_usage(existing))
    return [Disk(tuple(p), usage[2], usage[0]) for p, usage in found.values()]  # (total, used, free)


def _gb(n: int) -> str:
    return f"{n / (1 << 30):.1f} GB"


def check(s: Settings, extra: Sequence[Path] = ()) -> tuple[bool, str]:
    """(enough space, one line) for the disks of `writable_paths` and `extra`; not enough is below
    SEMG_MIN_FREE_DISK_MB."""
    try:
        found = disks([*writable_paths(s), *extra])
    except OSError as e:
        return False, f"free space of {s.state_dir} cannot be read ({e.strerror or e})"
    low = [d for d in found if d.low(s.semg_min_free_disk_mb)]
    shown = low or found
    text = "; ".join(f"{_gb(d.free)} free of {_gb(d.total)} at {d.paths[0]}" for d in shown)
    if low:
        return False, (f"{text}: under SEMG_MIN_FREE_DISK_MB={s.semg_min_free_disk_mb}; recordings stop being "
                       "stored when the disk is full: free space there, or delete sessions or users no longer needed")
    return True, text


class LowSpaceLog:
    """For a service's log: a WARNING when a disk goes low, again every `repeat_s` while it stays low, and one
    INFO line once there is room again."""

    def __init__(self, log: logging.Logger, repeat_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.log, self.repeat_s, self.clock = log, repeat_s, clock
        self._warned_at: float | None = None

    def update(self, ok: bool, line: str) -> None:
        now = self.clock()
        if not ok:
            if self._warned_at is None or now - self._warned_at >= self.repeat_s:
                self.log.warning("low disk space: %s", line)
                self._warned_at = now
        elif self._warned_at is not None:
            self.log.info("disk space is back above SEMG_MIN_FREE_DISK_MB: %s", line)
            self._warned_at = None


def sync_dir(directory: Path) -> None:
    """Make a name just given in `directory` (a rename, a link) survive a power loss: the file's own fsync does not
    write its directory entry, so after a crash it could still be under its temporary name, which nothing reads."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
