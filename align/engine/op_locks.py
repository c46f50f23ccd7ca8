"""Compile locks that a killed process does not leave behind for ever.

torch's extension loader, through which DeepSpeed compiles its ops (the CPU accelerator's shared-memory
communication op, CPU Adam), marks a build with a ``lock`` file in the op's build folder, and every other
process waits for as long as that file exists. A process killed mid-build (a stage stopped, a worker
lost, a lease rescued) leaves the file behind, and every later stage on the machine then waits for ever.

:class:`OwnedBaton` is torch's baton with an owner: its creator holds an ``flock`` on the file while it
builds, and the kernel drops that lock when the process dies, however it dies. A process that finds the
file with nobody holding it, and older than :data:`GRACE_SECONDS` (the creator takes its lock a moment
after creating the file), removes it: from :meth:`~OwnedBaton.try_acquire` it then builds the op itself;
from :meth:`~OwnedBaton.wait` it stops waiting, and loading an op the dead process never finished fails
with the loader's own error rather than hanging.

A build by a process that does not use this baton (torch or DeepSpeed run outside align, in align's
op cache) holds no flock, so align would take its file for abandoned after the grace period.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time

log = logging.getLogger(__name__)

GRACE_SECONDS = 5.0


def _remove_if_abandoned(path: str) -> bool:
    """Remove the lock file at ``path`` if no process holds its flock and it is older than the grace
    period; True when it was removed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its builder is alive
        held = os.fstat(fd)
        if time.time() - held.st_mtime < GRACE_SECONDS:
            return False  # just created: its builder may not have taken the lock yet
        try:
            if os.stat(path).st_ino != held.st_ino:
                return False  # another process removed it and a new build began meanwhile
            os.remove(path)
        except FileNotFoundError:
            return False
        log.warning("removed %s, left by a compile whose process died", path)
        return True
    finally:
        os.close(fd)


class OwnedBaton:
    """torch's :class:`~torch.utils.file_baton.FileBaton` (the same methods and file), whose creator holds an
    flock on the file while it builds."""

    def __init__(self, lock_file_path: str, wait_seconds: float = 0.1, warn_after_seconds: float | None = None):
        self.lock_file_path = lock_file_path
        self.wait_seconds = wait_seconds
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Create the file and lock it; False while another living process holds it."""
        for _ in range(2):
            try:
                self.fd = os.open(self.lock_file_path, os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                if not _remove_if_abandoned(self.lock_file_path):
                    return False
                continue
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return True
        return False

    def release(self) -> None:
        """Remove the file before dropping the lock, so no waiter sees it unheld."""
        os.remove(self.lock_file_path)
        if self.fd is not None:
            os.close(self.fd)

    def wait(self) -> None:
        """Sleep while the file exists and its builder lives."""
        while os.path.exists(self.lock_file_path):
            if _remove_if_abandoned(self.lock_file_path):
                return
            time.sleep(self.wait_seconds)


def use_owned_batons() -> None:
    """Make torch's extension loader (and so DeepSpeed's op builder) use :class:`OwnedBaton`."""
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.FileBaton = OwnedBaton
