"""Who owns a state directory: an exclusive flock on STATE/state/daemon.lock.

Exactly one process at a time may change a state directory — the daemon, or a
command that changes the model (`learn`, `rollback`, `restem`, `policy
rollback`, a task run by hand) — and only the owner repairs what a crash left
behind (temporary directories, adapters the database never committed).
Everyone else only reads: a reader that repaired could delete a version the
owner has renamed into place but not yet committed. The lock file holds the
owner's pid and what it is, so a refusal can name it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Self

from ..errors import SealError


class StateBusy(SealError):
    """Another process owns the state directory."""


def lock_path(state_dir: Path) -> Path:
    return state_dir / "state" / "daemon.lock"


def _holder(fd: int) -> tuple[int, str]:
    """(pid, role) written by the owner; (-1, '') when unreadable."""
    words = os.pread(fd, 200, 0).decode(errors="replace").split(maxsplit=1)
    pid = int(words[0]) if words and words[0].isdigit() else -1
    return pid, (words[1].strip() if len(words) > 1 else "daemon")


class StateLock:
    """The state directory's lock; `role` says who holds it ("daemon", "`seal-agent learn`")."""

    def __init__(self, state_dir: Path, role: str = "daemon"):
        self.path = lock_path(state_dir)
        self.state_dir = state_dir
        self.role = role
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, role = _holder(fd)
            os.close(fd)
            hint = ("drop documents into its inbox or POST them to /v1/documents, or stop it first"
                    if role == "daemon" else "wait for it to finish")
            raise StateBusy(f"a seal-agent {role} (pid {pid if pid >= 0 else '?'}) owns this state directory "
                            f"({self.state_dir}): {hint}; or use another --state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        self.fd = fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def holder(state_dir: Path) -> tuple[int, str] | None:
    """(pid, role) of the process owning this state directory, or None."""
    path = lock_path(state_dir)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running_pid(state_dir: Path) -> int | None:
    """The pid of the daemon owning this state directory, if one does (not a command's)."""
    h = holder(state_dir)
    return h[0] if h is not None and h[1] == "daemon" else None
