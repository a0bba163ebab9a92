"""An exclusive, OS-level lock on a folder aecore writes as a unit (a training run's
folder, an activation cache): a second writer fails at once, naming the holder. The
lock is ``flock`` on ``.aecore.lock`` inside the folder, so it dies with its process: a
killed run never leaves a stale lock. The file also records who holds the lock (PID,
host, command, start time) for the message. Re-entrant within a process (a pipeline
holds its folder across training and saving). Where ``fcntl`` is missing (Windows) the
folder is not locked."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from aecore.errors import InUseError
from aecore.io.atomic import write_error

LOCK_FILE = ".aecore.lock"

_held: dict[str, list] = {}  # real path -> [file object, depth]
_held_guard = threading.Lock()


def holder_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv) or sys.executable,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"PID {info['pid']} on {info['host']} ({info['command']!r}, since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it left no details)"


def _hold(path: Path):
    """``path`` opened and flock'ed exclusively, with this process's details written into
    it; None if another process holds it (or replaced the file while we opened it)."""
    import fcntl

    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (the caller keeps it open)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # a holder that removes its lock file on release may have done so just now
        if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:
            raise OSError("lock file replaced")
    except OSError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(holder_record()) + "\n")
    f.flush()
    return f


class FolderLock:
    """``with FolderLock(folder, "train into"):`` holds ``folder`` for this process."""

    def __init__(self, folder: str | os.PathLike, purpose: str = "write") -> None:
        self.folder = Path(folder)
        self.purpose = purpose
        self._key = ""
        # what the lock itself added, taken away again when the run fails
        self._made_folder = self._made_file = False

    def __enter__(self) -> FolderLock:
        try:
            import fcntl  # noqa: F401
        except ImportError:  # no flock here: unlocked
            return self
        self._made_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.folder, "create the folder", exc) from None
        self._key = str(self.folder.resolve())
        with _held_guard:
            if self._key in _held:
                _held[self._key][1] += 1
                return self
            path = self.folder / LOCK_FILE
            self._made_file = not path.exists()
            try:
                f = _hold(path)
            except OSError as exc:
                self._key = ""
                raise write_error(
                    self.folder, f"create a lock file ({LOCK_FILE}) in", exc
                ) from None
            if f is None:
                self._key = ""
                raise InUseError(
                    f"cannot {self.purpose} {self.folder}: it is in use by "
                    f"{describe_holder(path)}; wait for that run to finish, or choose "
                    f"another folder"
                )
            _held[self._key] = [f, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._key:
            return
        with _held_guard:
            entry = _held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                failed = exc[0] is not None
                if failed and self._made_file:  # a refused run leaves the folder as it was
                    (self.folder / LOCK_FILE).unlink(missing_ok=True)
                entry[0].close()  # closing releases the flock
                if failed and self._made_folder:
                    with contextlib.suppress(OSError):  # only an empty folder goes
                        self.folder.rmdir()


def writer_of(folder: str | os.PathLike) -> str | None:
    """Who holds ``folder``'s lock in another process (as ``describe_holder`` says), or
    None when nobody else does."""
    try:
        import fcntl
    except ImportError:
        return None
    folder = Path(folder)
    path = folder / LOCK_FILE
    if not path.exists():
        return None
    with _held_guard:
        if str(folder.resolve()) in _held:
            return None  # this process
    try:
        with open(path, encoding="utf-8") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return describe_holder(path)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except OSError:
        return None
    return None


class FileLock:
    """``with FileLock(path, "export to"):`` holds a file target (an ONNX export) for this
    process: a lock file ``.NAME.aecore.lock`` beside it, removed again on release."""

    def __init__(self, path: str | os.PathLike, purpose: str = "write") -> None:
        self.path = Path(path)
        self.purpose = purpose
        self.lock_path = self.path.parent / _lock_name(self.path.name)
        self._file = None

    def __enter__(self) -> FileLock:
        try:
            import fcntl  # noqa: F401
        except ImportError:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = _hold(self.lock_path)
        except OSError as exc:  # named by the target, not the hidden lock file
            raise write_error(
                self.path, "create the folder of, or a lock file beside,", exc
            ) from None
        if self._file is None:
            raise InUseError(
                f"cannot {self.purpose} {self.path}: it is being written by "
                f"{describe_holder(self.lock_path)}; wait for that to finish, or choose "
                f"another name"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self.lock_path.unlink(missing_ok=True)  # before the unlock: see _hold
            self._file.close()
            self._file = None


def _lock_name(name: str) -> str:
    """``.NAME.aecore.lock``; a name too long to take the suffix within the file system's
    255 bytes is cut, with a digest of the whole name so that two such names never share
    a lock."""
    raw = os.fsencode(name)  # the bytes on disk (undecodable ones included)
    if len(raw) + len(LOCK_FILE) + 1 <= 255:
        return f".{name}{LOCK_FILE}"
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f".{os.fsdecode(raw[:120])}~{digest}{LOCK_FILE}"
