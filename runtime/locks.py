"""Exclusive claims on directories: one node per data directory, one process per partition store.

A claim is an advisory `flock` on a file in the directory, held until the process exits. The kernel drops it
when the process dies, even by SIGKILL, so a crash never leaves a stale claim behind. The file records the
holder's pid for the error message of whoever is refused.
"""

from __future__ import annotations

import fcntl
import os


class ClaimHeld(Exception):
    """Another process holds the claim."""

    def __init__(self, path: str, holder: int | None) -> None:
        super().__init__(f"{path} is held by " + (f"pid {holder}" if holder else "another process"))
        self.path = path
        self.holder = holder


def claim(path: str) -> int:
    """Take the exclusive claim at `path` (created if missing) and return its descriptor, to keep open.

    The descriptor is not inherited by child processes (PEP 446), so the claim ends with this process.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _recorded_pid(fd)
        os.close(fd)
        raise ClaimHeld(path, holder) from None
    try:
        record = f"{os.getpid()}\n".encode()
        os.pwrite(fd, record, 0)  # then cut: a reader meanwhile still finds a pid on the first line
        os.ftruncate(fd, len(record))
    except OSError:
        os.close(fd)
        raise
    return fd


def _recorded_pid(fd: int) -> int | None:
    try:
        first_line = os.pread(fd, 32, 0).decode("ascii", "replace").split("\n", 1)[0].strip()
        return int(first_line) if first_line else None
    except (OSError, ValueError):
        return None
