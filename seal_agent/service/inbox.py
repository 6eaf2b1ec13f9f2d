"""The watched inbox: files dropped into a folder become learning jobs.

What the inbox takes. watchdog reports changes; an entry is taken only once it
is complete: moved in (a rename is atomic), or its size and mtime unchanged for
`stable_s` seconds. Entries already there at start-up are taken too. Hidden
and temporary names (`.part`, `~`, `.swp`, `.tmp`, `.crdownload`, `~$...`,
`.name`) and the daemon's own folders (`done/`, `rejected/`) are left alone.

What is read, once. Taking a file reads its bytes once, through one file
descriptor, and every check is made on that descriptor: the entry is opened
without following a symlink; a symlink is followed only to a file inside the
inbox, reached folder by folder without following any further link, so a link
swapped after it was resolved is refused rather than followed; the opened file
must be a regular file (a FIFO is opened without blocking and refused), not
empty and at most `max_bytes` (counted as read, not as stat said). Those bytes
are hashed and the daemon queues its own copy of them (`jobs.Copies`, under
STATE/state/queue/): the learner reads that copy, so what is learned is
exactly what was checked and hashed, whatever happens to the inbox file after.
The job and the document still name the inbox path the user gave.

What happens to an entry. Each ends in one of three places:
  - `done/` once learned (or left in place, remembered by its hash, with
    `inbox.after = "keep"`); a file whose content was already learned is
    recorded as a duplicate of that job and moved there too;
  - `rejected/`, next to `<name>.reason.txt`, when it cannot be learned: not
    a regular file, a folder ("folders are not taken: drop the files
    themselves"; the folder is moved as a whole), a symlink leading outside
    the inbox, dangling or looping, empty, too large, an unsupported type, a
    name that is not UTF-8, content that cannot be parsed, any other error
    while taking it, or a job that failed `daemon.max_attempts` times (or
    during which the daemon crashed as many times);
  - the inbox itself, when its content changed after it was queued: the job
    of the old content does not move it; the new content is a job of its own.

Guarantees.
  - Nothing put in the inbox is deleted or modified: entries are only moved,
    whole (a symlink as the link, a folder with what it holds).
  - Nothing the daemon writes overwrites anything: a file and its reason file
    get a name free for both (`name.1.txt` with `name.1.txt.reason.txt`,
    shortened if needed so both fit the file system's 255 bytes); reason files
    are created exclusively (a reason file whose move then fails is removed,
    being the daemon's own); moves and API uploads fail rather than replace
    (renameat2 RENAME_NOREPLACE; without it a hard link, or for a folder a
    check just before the rename). The queue's copies live in the daemon's
    own folder and go once their job is over.
  - One bad entry never holds back another: any failure while taking one ends
    with that one rejected and a reason, and the others of the same poll are
    still taken; an entry that cannot even be stat'ed no longer fails the
    whole poll.
  - Names are shown escaped (`documents.shown`) in logs and reasons, so a
    name with a line break or an escape sequence cannot forge a log line.
  - The API (`Daemon.submit`) checks a name by the same rules before writing
    anything (`upload_problem`: plain, printable, not hidden or temporary,
    a supported type, at most 255 bytes) and removes its temporary file on
    any failure.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ..config import InboxConfig
from ..documents import SUPPORTED, shown

log = logging.getLogger("seal_agent.inbox")

DONE, REJECTED = "done", "rejected"
REASON = ".reason.txt"
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, apfs)
TEMP_SUFFIXES = (".part", "~", ".swp", ".swx", ".tmp", ".crdownload", ".partial")
FOLDER = "folders are not taken: drop the files themselves"


class Refused(Exception):
    """An inbox entry that will not be learned; the message is the reason."""


# -- names (pure) ----------------------------------------------------------

def ignored(path: Path, inbox: Path) -> bool:
    """Not a top-level entry of the inbox (done/ and rejected/ included), hidden, or temporary."""
    if path.parent != inbox:
        return True
    name = path.name
    return name in (DONE, REJECTED) or name.startswith((".", "~$")) or name.endswith(TEMP_SUFFIXES)


def name_problem(name: str) -> str | None:
    """Why a file of this name is not learned, from the name alone; None if it may be."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # the job and document tables hold names as text: a byte that is not UTF-8 cannot be stored
        return "the file name is not valid UTF-8: rename the file and drop it again"
    suffix = Path(name).suffix
    if suffix.lower() not in SUPPORTED:
        return (f"unsupported file type '{shown(suffix or '(none)')}' "
                f"(supported: {', '.join(sorted(SUPPORTED))})")
    return None


def upload_problem(name: str) -> str | None:
    """Why the API refuses a document named `name`, found before anything is written."""
    plain = name and name not in (".", "..") and not any(c in name for c in "/\\\x00")
    if not plain:
        return f"bad file name {name!r}: a plain name such as notes.md, no folders"
    if not name.isprintable():
        return f"bad file name {name!r}: no control characters or line breaks; a plain name such as notes.md"
    if ignored(Path("inbox") / name, Path("inbox")):
        return (f"bad file name {name!r}: the inbox leaves hidden and temporary names alone "
                f"(starting with '.' or '~$', ending with {', '.join(TEMP_SUFFIXES)}, or {DONE}/{REJECTED})")
    if len(os.fsencode(name)) > NAME_MAX:
        return f"bad file name: {len(os.fsencode(name))} bytes is over the file system's {NAME_MAX}"
    reason = name_problem(name)
    return f"{name!r}: {reason}" if reason else None


def _fit(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes, at a character boundary."""
    while text and len(os.fsencode(text)) > limit:
        text = text[:-1]
    return text


def free_names(name: str, room: int = len(REASON)) -> Iterator[str]:
    """`name`, then `stem.1.suffix`, `stem.2.suffix`...: candidates for a file moved
    next to others, each short enough that `room` more bytes (its reason file's
    suffix) still fit in NAME_MAX."""
    stem, suffix = Path(name).stem, Path(name).suffix
    if len(os.fsencode(suffix)) > 32:  # not a file type, just a long name with a dot in it
        stem, suffix = name, ""
    for i in itertools.count():
        tail = (f".{i}" if i else "") + suffix
        yield (_fit(stem, NAME_MAX - room - len(os.fsencode(tail))) or "_") + tail


# -- reading an entry once ---------------------------------------------------

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | _CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | _CLOEXEC


def _open_beneath(inbox_fd: int, parts: tuple[str, ...]) -> int:
    """Open `parts` under the inbox folder by folder, following no symlink on the way."""
    fd = inbox_fd
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, _OPEN_DIR, dir_fd=fd)
            if fd != inbox_fd:
                os.close(fd)
            fd = next_fd
        return os.open(parts[-1], _OPEN_FILE, dir_fd=fd)
    finally:
        if fd != inbox_fd:
            os.close(fd)


def _open_entry(inbox_fd: int, inbox: Path, name: str) -> int:
    try:
        return os.open(name, _OPEN_FILE, dir_fd=inbox_fd)
    except OSError as e:
        if e.errno != errno.ELOOP:  # ELOOP: the entry itself is a symlink
            raise Refused(f"cannot be opened ({e.strerror})") from None
    try:
        target = Path(os.path.realpath(inbox / name, strict=True))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Refused("a symlink loop: not followed") from None
        if e.errno == errno.ENOENT:
            raise Refused("a symlink to nothing (its target does not exist)") from None
        raise Refused(f"a symlink that cannot be followed ({e.strerror})") from None
    root = Path(os.path.realpath(inbox))
    if not target.is_relative_to(root):
        raise Refused(f"symlink to {shown(target)}, outside the inbox: not followed")
    parts = target.relative_to(root).parts
    if not parts:
        raise Refused(FOLDER)  # a link to the inbox itself
    try:
        return _open_beneath(inbox_fd, parts)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused("a symlink that changed while it was being followed: not followed") from None
        raise Refused(f"a symlink whose target cannot be opened ({e.strerror})") from None


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return what
    return "not a regular file"


def read_entry(path: Path, inbox: Path, max_bytes: int) -> bytes:
    """The bytes of the inbox entry `path`, read once through one open file that
    every check was made on; raises `Refused` with the reason it is not learned."""
    inbox_fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        fd = _open_entry(inbox_fd, inbox, path.name)
    finally:
        os.close(inbox_fd)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Refused(FOLDER)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{_kind(st.st_mode)}, not a regular file: only files are learned")
        reason = name_problem(path.name)
        if reason is not None:
            raise Refused(reason)
        if st.st_size > max_bytes:
            raise Refused(f"{st.st_size:,} bytes is over the limit of {max_bytes:,} (inbox.max_bytes)")
        chunks, size = [], 0
        while size <= max_bytes:  # the file may have grown since fstat: count what is read
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise Refused(f"cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise Refused(f"over the limit of {max_bytes:,} bytes (inbox.max_bytes)")
    if size == 0:
        raise Refused("empty file")
    return b"".join(chunks)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def problem(path: Path, inbox: Path, max_bytes: int) -> str | None:
    """Why this entry cannot be learned; None if it may be (reads it as taking it would)."""
    try:
        read_entry(path, inbox, max_bytes)
    except Refused as e:
        return str(e)
    return None


# -- writing without overwriting ---------------------------------------------

def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, raising FileExistsError rather than replacing whatever
    `dst` is (os.rename replaces a file, a symlink or an empty folder silently)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # those: this file system lacks it
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if stat.S_ISDIR(os.lstat(src).st_mode):
        if os.path.lexists(dst):  # a folder has no hard links: check, then rename
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst, follow_symlinks=False)  # fails if dst exists
    os.unlink(src)


def write_new(path: Path, text: str) -> None:
    """Create `path` with `text`; FileExistsError if anything (a dangling symlink too) is there."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)


def _folder(inbox: Path, folder: str) -> Path:
    dest = inbox / folder
    try:
        dest.mkdir(exist_ok=True)
    except FileExistsError:
        pass
    if not dest.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"not a folder: move it away so the inbox can keep its "
                                 f"{folder} files there", str(dest))
    return dest


def move_to(path: Path, inbox: Path, folder: str, reason: str | None = None) -> Path:
    """Move an inbox entry (a file, a folder, a symlink, never a symlink's target) into
    done/ or rejected/, with `<name>.reason.txt` beside it when a reason is given,
    under a name free for both. Overwrites nothing; returns where it went."""
    dest_dir = _folder(inbox, folder)
    text = None if reason is None else shown(reason).rstrip() + "\n"
    for name in free_names(path.name):
        target, reason_file = dest_dir / name, dest_dir / f"{name}{REASON}"
        if os.path.lexists(target) or (text is not None and os.path.lexists(reason_file)):
            continue
        if text is not None:
            try:
                write_new(reason_file, text)
            except FileExistsError:
                continue
        try:
            rename_noreplace(path, target)
        except BaseException as e:
            if text is not None:
                reason_file.unlink(missing_ok=True)  # written just now, for this move only
            if isinstance(e, FileExistsError):
                continue
            raise
        return target
    raise AssertionError("unreachable: free_names never ends")


# -- the watcher -------------------------------------------------------------

class Inbox:
    """Watches `directory` and calls `take(path)` once per complete entry (folders
    included: taking one rejects it)."""

    def __init__(self, directory: Path, cfg: InboxConfig, take: Callable[[Path], object]):
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

        # Folders too: a folder dropped in is rejected with a reason, not ignored forever.
        class Handler(FileSystemEventHandler):
            def on_created(self, event: FileSystemEvent) -> None:
                inbox._note(Path(os.fsdecode(event.src_path)))

            def on_modified(self, event: FileSystemEvent) -> None:
                inbox._note(Path(os.fsdecode(event.src_path)))

            def on_moved(self, event: FileSystemEvent) -> None:
                inbox._note(Path(os.fsdecode(event.dest_path)), moved_in=True)

            def on_closed(self, event: FileSystemEvent) -> None:
                inbox._note(Path(os.fsdecode(event.src_path)))

        return Handler()

    # -- stability -------------------------------------------------------
    def _complete(self) -> list[Path]:
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
                except OSError:
                    complete.append(path)  # cannot even be looked at: taking it rejects it with the reason
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
        return sorted(complete)

    def poll(self) -> list[Path]:
        """Entries that became complete since the last poll, each taken; one that
        fails to be taken is logged and the others are taken all the same."""
        complete = self._complete()
        for path in complete:
            try:
                self.take(path)
            except Exception:  # the caller's own rejection failed too: log it, take the rest
                log.exception("%s could not be taken", shown(path.name))
        return complete

    def scan(self) -> None:
        """Everything already in the inbox (the daemon may have been down when it arrived)."""
        for path in sorted(self.dir.iterdir()):
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
            except Exception:  # the watcher must outlive any one poll
                log.exception("inbox poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
