"""One chat per memory file: an advisory lock held for as long as a chat may write the file.

Owns the lock file beside a state file (`<name>.lock`, holding the owner's pid) and the
one-line refusal naming the process that holds it. The operating system drops the lock
when its process dies, however it dies, so a crash never leaves a memory locked. It
knows nothing of chats or modules: the session decides which file to lock and when.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmm.state import StateFileError


class MemoryInUseError(StateFileError):
    """Another process holds the memory file. The message is one line."""


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


class MemoryLock:
    """An exclusive, non-blocking lock on `path` (the state file itself is never opened)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise MemoryInUseError naming the holder's pid."""
        if self._fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; one chat per memory is the user's care
            return
        target = lock_path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MemoryInUseError(
                f"memory {self.path} is in use by another lmm chat (pid {holder}); "
                "close that chat first or use another memory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)  # closing drops the flock; the lock file stays, empty locks are harmless

    @property
    def held(self) -> bool:
        return self._fd is not None
