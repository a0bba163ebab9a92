"""Atomic file writes: a crash or a failed write never leaves a half-written file or
loses the previous one. torch-free (the runtime's command line writes with it too)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from aecore.errors import FileWriteError


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then ``os.replace``:
    a crash mid-write leaves the previous file intact."""
    path = Path(path)
    if path.is_symlink():  # replace the file the link names, and keep the link
        path = path.resolve()
    step = "create the folder of"
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        step = "create a temporary file beside"
        prefix = f"{_temp_stem(path)}{os.getpid()}."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        step = "set the permissions of"
        os.fchmod(fd, _mode_for(path))
        step = "write"
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            step = "sync to disk"
            os.fsync(f.fileno())
        step = "replace"
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, FileWriteError):
            raise
        raise write_error(path, step, exc) from exc
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _remove_stale_temps(path)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _temp_stem(path: Path) -> str:
    """The start of the names of ``path``'s temp files (a long name cut short, so that
    the temp name stays within the file system's limit)."""
    return f".{os.fsdecode(os.fsencode(path.name)[:120])}."


def _remove_stale_temps(path: Path) -> None:
    """Removes temp files of ``path`` that a writer killed mid-write left (SIGKILL skips
    the cleanup): those of processes that no longer run. Another live writer's (two
    processes saving one file) are its own to finish."""
    stem = _temp_stem(path)
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(stem) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        # ours are STEM + "PID.RANDOM.tmp": a longer sibling's ("model.onnx" beside
        # "model") has another dot, and is not ours to judge
        parts = name[len(stem) : -len(".tmp")].split(".")
        if len(parts) != 2 or not parts[0].isdigit() or _running(int(parts[0])):
            continue
        (path.parent / name).unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if os.name != "posix":  # no signal 0 to ask with: leave the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _mode_for(path: Path) -> int:
    """The replaced file's permissions, else what ``open`` would give a new file (0666
    less the umask): mkstemp's 0600 would hide models from the account serving them."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_error(path: Path, step: str, exc: OSError) -> FileWriteError:
    """A FileWriteError naming ``path``, the step that failed and why."""
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    kept = " (the previous version is unchanged)" if path.exists() else ""
    error = FileWriteError(f"could not {step} {path}: {reason}{f' [{code}]' if code else ''}{kept}")
    error.errno = exc.errno
    return error
