"""Small helpers every layer uses, each written once: atomic file writes, an output folder written as one unit
(staged, then switched in with one rename), the lock of a folder, file modes that respect the umask, free disk
space, a free TCP port, peak memory.

Nothing here imports torch at module level or keeps state between calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import math
import os
import resource
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """This process's umask, read without changing it (Linux: /proc); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0666 less the umask (0644 under umask 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder: 0777 less the umask."""
    return 0o777 & ~umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step, else it is removed.

    The temporary file is created exclusively (``mkstemp``: O_CREAT|O_EXCL, unpredictable name) in the target's
    folder, so a planted symlink is never followed and the final ``os.replace`` stays on one filesystem. A reader,
    or a kill at any instant, sees the old file or the new one, never a part. Its mode is what ``open`` would
    give (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, file_mode())  # mkstemp makes 0600 whatever the umask: a team could not read each other's files
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically (see :func:`atomic_path`), synced to disk."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


# ------------------------------------------------------------------------------------------- folder locks
class Busy(OSError):
    """A lock held by another process; ``holder`` is the pid it wrote (or "unknown")."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(errno.EWOULDBLOCK, f"{path} is locked by pid {holder}")
        self.path, self.holder = path, holder


def lock(path: str | os.PathLike, shared: bool = False) -> int | None:
    """Take ``path`` (created if absent) with ``flock``: exclusive for a writer, ``shared`` for readers that must not
    see the folder change under them. Returns the descriptor (close it, or exit, to release: the OS releases it
    however the process ends, so a killed holder never leaves a stale lock); raises :class:`Busy` if it is held.

    A reader of a folder it may not write beside (another team's, read-only) reads without a lock: None."""
    path = Path(path)
    try:
        if not shared:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, file_mode())
    except OSError as e:
        if not shared or isinstance(e, IsADirectoryError):
            raise
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Busy(path, holder) from None
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def folder_lock_path(folder: str | os.PathLike) -> Path:
    """Where the lock of an output folder lives: beside it (``.NAME.lock``), since the folder itself is replaced."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


# -------------------------------------------------------------------------------- a folder as one unit
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    except (OSError, AttributeError):
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def stage_folder(dest: str | os.PathLike) -> Path:
    """A new empty folder beside ``dest`` (``.NAME.stage-XXXX``, the umask's mode) to write a new version into."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = dest.parent / f".{dest.name}.stage-{uuid.uuid4().hex[:12]}"
    stage.mkdir(mode=dir_mode())
    return stage


def switch_folder(stage: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Make the complete folder ``stage`` the folder ``dest`` with one rename; the old ``dest`` is then removed.

    A reader, or a kill at any instant, sees the old folder or the new one, never a mix: where ``dest`` exists the
    two are exchanged atomically (``renameat2(RENAME_EXCHANGE)``). Where the filesystem cannot exchange, the old
    folder is first renamed aside (``.NAME.old-XXXX``), which :func:`clean_stages` renames back if a kill
    came between the two renames. The step every later versioned update of a folder builds on.
    """
    stage, dest = Path(stage), Path(dest)
    if not dest.exists():
        os.rename(stage, dest)
        return
    if _exchange(stage, dest):  # `stage` now holds the old folder
        shutil.rmtree(stage, ignore_errors=True)
        return
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(dest, old)
    os.rename(stage, dest)
    shutil.rmtree(old, ignore_errors=True)


def clean_stages(dest: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``dest`` left beside it (stages, old versions); call it holding the folder's
    lock. An old version is renamed back first when ``dest`` itself is missing (a kill between the fallback's two
    renames). Returns what was removed."""
    dest = Path(dest)
    olds = sorted(dest.parent.glob(f".{dest.name}.old-*"))
    if olds and not dest.exists():
        os.rename(olds.pop(), dest)
    gone = sorted(dest.parent.glob(f".{dest.name}.stage-*")) + olds
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def new_version(dest: str | os.PathLike) -> Iterator[Path]:
    """Write the next version of the folder ``dest`` as one unit: hold its lock (:class:`Busy` if another writer
    does), remove what killed writers left (:func:`clean_stages`), yield a stage folder that replaces ``dest`` in
    one rename once the block completes (:func:`staged`)."""
    fd = lock(folder_lock_path(dest))
    try:
        clean_stages(dest)
        with staged(dest) as stage:
            yield stage
    finally:
        unlock(fd)


@contextlib.contextmanager
def staged(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a new folder to write ``dest``'s next version into; on success it replaces ``dest`` in one step
    (:func:`switch_folder`), on any failure it is removed and ``dest`` stays as it was. Hold ``dest``'s lock."""
    stage = stage_folder(dest)
    try:
        yield stage
        switch_folder(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def folder_identity(folder: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of ``folder``: a reader compares it before and after reading to know that no
    :func:`switch_folder` replaced the folder in between. None when absent."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the filesystem that holds ``path`` or, if it does not exist yet, its parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def is_disk_full(error: BaseException) -> bool:
    """Whether a write failed for want of space: ENOSPC/EDQUOT, or torch's C++ writers, which lose the errno and say
    ``basic_ios::clear`` or ``file write failed`` instead."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(s in text for s in ("No space left", "basic_ios::clear", "file write failed", "unexpected pos"))


def progress_bar(total: int | None, desc: str, unit: str, disable: bool = False):
    """A tqdm bar on stderr with a total, shown also when stderr is a log file (Slurm, a pipe), where tqdm would
    otherwise stay silent: there it redraws every 15 s instead of 10 times a second."""
    import sys

    from tqdm import tqdm

    interval = 0.1 if sys.stderr.isatty() else 15.0
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, mininterval=interval, file=sys.stderr)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (bind to port 0 and let the kernel choose)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB.

    Linux: ``VmHWM`` of /proc/self/status, which starts afresh at exec; ``ru_maxrss`` would also count the RSS
    of the parent at fork time (a benchmark that spawns a command would measure itself), so it is the fallback only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def release_freed_memory() -> None:
    """Give memory that was freed back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    A dropped Faiss index leaves its pages in the allocator's heap: at 1M x 256 the tuned-and-spilled IVF kept
    0.67 of its 1.49 GiB resident, and the HNSW built next took the index build to 1.98 GiB peak, 1.61 with this."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def standard_error(value: float, n: int) -> float:
    """Upper bound of the standard error of a mean of ``n`` values in [0, 1] whose mean is ``value`` (inf for n = 0):
    how far apart two validations of a run must be to tell them apart (train selection and its warning)."""
    return math.sqrt(max(value * (1 - value), 0.0) / n) if n > 0 else float("inf")
