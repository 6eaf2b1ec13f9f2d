"""The watched inbox: files dropped into a folder become learning jobs.

watchdog reports changes; a file is taken only once it is complete: moved in
(a rename is atomic), or its size and mtime unchanged for `stable_s` seconds.
Files already there at start-up are taken too. Hidden and temporary files
(`.part`, `~`, `.swp`, `.tmp`, `.crdownload`) and the daemon's own folders
(`done/`, `rejected/`) are ignored. A file that cannot be learned (symlink
leading outside the inbox, too large, empty, unsupported type) is moved to
`rejected/` with `<name>.reason.txt`; a learned one to `done/` (or left in
place, remembered by its hash, with `inbox.after = "keep"`). Nothing is ever
deleted; a name already taken in done/ or rejected/ gets a numbered suffix.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .config import InboxConfig
from .documents import SUPPORTED

DONE, REJECTED = "done", "rejected"
TEMP_SUFFIXES = (".part", "~", ".swp", ".swx", ".tmp", ".crdownload", ".partial")


def ignored(path: Path, inbox: Path) -> bool:
    """Not a top-level file of the inbox (done/ and rejected/ included), hidden, or temporary."""
    if path.parent != inbox:
        return True
    name = path.name
    return name in (DONE, REJECTED) or name.startswith((".", "~$")) or name.endswith(TEMP_SUFFIXES)


def problem(path: Path, inbox: Path, max_bytes: int) -> str | None:
    """Why this file cannot be learned, found without reading it; None if it may be."""
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(inbox.resolve()):
            return f"symlink to {target}, outside the inbox: not followed"
    if not path.is_file():
        return "not a regular file"
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    if size > max_bytes:
        return f"{size:,} bytes is over the limit of {max_bytes:,} (inbox.max_bytes)"
    if path.suffix.lower() not in SUPPORTED:
        return f"unsupported file type '{path.suffix or '(none)'}' (supported: {', '.join(sorted(SUPPORTED))})"
    return None


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    i = 1
    while target.exists() or target.is_symlink():
        target = folder / f"{stem}.{i}{suffix}"
        i += 1
    return target


def move_to(path: Path, inbox: Path, folder: str, reason: str | None = None) -> Path:
    """Move a file (or symlink, not its target) into done/ or rejected/, with a reason file."""
    dest_dir = inbox / folder
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = _free_name(dest_dir, path.name)
    shutil.move(str(path), str(target))
    if reason is not None:
        (dest_dir / f"{target.name}.reason.txt").write_text(reason.rstrip() + "\n", encoding="utf-8")
    return target


class Inbox:
    """Watches `cfg.dir` and calls `take(path)` once per complete file."""

    def __init__(self, directory: Path, cfg: InboxConfig, take: Callable[[Path], None]):
        self.dir = directory
        self.cfg = cfg
        self.take = take
        self._pending: dict[Path, tuple[int, float, float]] = {}  # path -> (size, mtime, since)
        self._ready: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: Observer | None = None
        self._thread: threading.Thread | None = None

    # -- events ----------------------------------------------------------
    def _note(self, path: Path, moved_in: bool = False) -> None:
        if ignored(path, self.dir):
            return
        with self._lock:
            if moved_in:
                self._ready.add(path)
            self._pending.setdefault(path, (-1, -1.0, time.monotonic()))

    def _handler(self) -> FileSystemEventHandler:
        inbox = self

        class Handler(FileSystemEventHandler):
            def on_created(self, event: FileSystemEvent) -> None:
                if not event.is_directory:
                    inbox._note(Path(os.fsdecode(event.src_path)))

            def on_modified(self, event: FileSystemEvent) -> None:
                if not event.is_directory:
                    inbox._note(Path(os.fsdecode(event.src_path)))

            def on_moved(self, event: FileSystemEvent) -> None:
                if not event.is_directory:
                    inbox._note(Path(os.fsdecode(event.dest_path)), moved_in=True)

            def on_closed(self, event: FileSystemEvent) -> None:
                if not event.is_directory:
                    inbox._note(Path(os.fsdecode(event.src_path)))

        return Handler()

    # -- stability -------------------------------------------------------
    def poll(self) -> list[Path]:
        """Files that became complete since the last poll (and are taken)."""
        now = time.monotonic()
        complete = []
        with self._lock:
            for path, (size, mtime, since) in list(self._pending.items()):
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    del self._pending[path]
                    self._ready.discard(path)
                    continue
                if (st.st_size, st.st_mtime) != (size, mtime):
                    self._pending[path] = (st.st_size, st.st_mtime, now)
                    if path not in self._ready:
                        continue
                if path in self._ready or now - self._pending[path][2] >= self.cfg.stable_s:
                    complete.append(path)
                    del self._pending[path]
                    self._ready.discard(path)
        for path in complete:
            self.take(path)
        return complete

    def scan(self) -> None:
        """Everything already in the inbox (the daemon may have been down when it arrived)."""
        for path in sorted(self.dir.iterdir()):
            if not path.is_dir() or path.is_symlink():
                self._note(path)

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(self._handler(), str(self.dir), recursive=False)
        self._observer.start()
        self.scan()
        self._thread = threading.Thread(target=self._run, name="inbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            try:
                self.poll()
            except Exception:
                import logging

                logging.getLogger("seal_agent.inbox").exception("inbox poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
