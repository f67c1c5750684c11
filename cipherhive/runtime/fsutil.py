"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cipherhive.runtime.errors import UserError


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, *, mode: int = 0o600) -> Iterator[BinaryIO]:
    """A file object whose content replaces ``path`` only once the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def removed_on_error(path: Path, *, keep: bool = False) -> Iterator[Path]:
    """Remove the folder ``path`` if the block raises (an error, Ctrl-C), unless ``keep``.

    For a run's temporary work folder, which may hold secret contexts and private keys: a run
    that ends decides itself what to keep (its logs after a failure it reports); a run cut
    short leaves nothing behind.
    """
    try:
        yield path
    except BaseException:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
        raise


def atomic_write(path: Path, data: bytes | Iterable[bytes], *, mode: int = 0o600) -> int:
    """Write to a temporary file in the same directory, fsync, rename. Returns bytes written."""
    written = 0
    with atomic_file(path, mode=mode) as fh:
        for part in [data] if isinstance(data, bytes | bytearray) else data:
            fh.write(part)
            written += len(part)
    return written


class PrivateFileError(PermissionError):
    """A private key or secret file that other users could read."""


def require_private_file(path: Path, what: str) -> None:
    """Refuse a private file (TLS key, secret context) that the group or others may read.

    A key another local user can read is a key that user holds: refuse to use it
    rather than warn, and say how to fix it.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise PrivateFileError(f"{what} {path} does not exist") from None
    if mode & 0o077:
        raise PrivateFileError(
            f"{what} {path} has mode {mode:o}; other users could read it. Run: chmod 600 {path}"
        )


def read_guarded(path: Path, max_bytes: int, refuse: Callable[[str], Exception], missing: str) -> bytes:
    """Read a fail-closed record (a ledger): refuse (``refuse(why)``) if it is missing, writable by
    others, larger than ``max_bytes`` or unreadable; never fall back to an empty one."""
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise refuse(f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})")
        if st.st_size > max_bytes:
            raise refuse("is implausibly large")
        with open(path, "rb") as fh:
            return fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise refuse(f"is missing ({missing})") from None
    except OSError as exc:
        raise refuse(f"cannot be read ({os.strerror(exc.errno or 0)})") from None


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: the server's state is nobody else's."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> None:
    """Create ``path`` empty at mode 0600 if missing, or tighten it to 0600 if it exists."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


#: The file a running daemon holds locked in its state directory.
LOCK_FILE = "daemon.lock"


class StateDirInUse(UserError):
    """Another daemon holds the state directory."""


class StateDirLock:
    """A daemon's hold on its state directory: a second daemon on it is refused, naming the first.

    Two daemons on one state directory would each resend, commit and release from the same
    round files and ledgers as if alone, and two servers would recover and serve one database.
    The lock is ``flock`` on :data:`LOCK_FILE`: the kernel drops it when the process ends,
    however it ends, so a crash never leaves a stale lock behind.
    """

    def __init__(self, state_dir: Path, what: str) -> None:
        import fcntl

        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "its pid is unknown"
            os.close(fd)
            raise StateDirInUse(
                f"{state_dir} is in use by another cipherhive {what} ({holder}); stop that one first, "
                f"or give this {what} a state directory of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextmanager
def exclusive_state_dir(state_dir: Path, what: str) -> Iterator[None]:
    """Hold ``state_dir`` (:class:`StateDirLock`) while the block runs."""
    lock = StateDirLock(state_dir, what)
    try:
        yield
    finally:
        lock.release()
