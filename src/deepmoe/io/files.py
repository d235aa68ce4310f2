"""Atomic writes, the one implementation for checkpoints, reports, logs and caches: a file (or a
directory) is written next to its target under a temporary name, fsynced, then renamed into place, so
that a reader or a crash sees the old contents or the new ones, never a mixture.

And the one guard of every command's output directory (`claim_directory`): a lock against a second
process writing the same target, and a refusal of a non-empty target that is not the command's own
kind of output, so that no command deletes or overwrites what it did not create.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """fsync a file or, with `directory`, a directory (where the filesystem refuses that, nothing)."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        if not directory:
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """Give a file or directory made by `tempfile` (mode 0600/0700) the usual permissions (umask)."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def is_temporary(name: str) -> bool:
    """Whether `name` is one of the temporaries `atomic_write` / `atomic_directory` create next to a target."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def remove_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete what a killed process left of its atomic writes in `directory` (never a complete file).

    Call it only where no other process is writing into `directory`. Returns the names removed.
    """
    directory = Path(directory)
    removed = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        if is_temporary(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Replace the file `path` with `data`: bytes, a str (written as UTF-8), or a function that writes
    to the binary file it is given. Temporary file next to `path`, fsync, the usual permissions, rename,
    fsync of the directory; on any error the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent, directory=True)
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """`atomic_write` of `data` as JSON (indent 2, sorted keys, a final newline)."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_directory(
    target: str | os.PathLike, replaces: Callable[[Path], Collection[str]] | None = None
) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `target`; on success, make it `target`.

    Files the caller writes there must be complete (fsynced) when the block ends. An existing `target`
    is replaced as a whole, unless `replaces` is given: then its entries not named in `replaces(target)`
    (and not written anew) are carried over. The swap is one atomic rename-exchange where the OS
    offers it, else two renames (the old directory is put back if the second fails). If the block
    raises, the temporary directory is removed and `target` is left as it was.
    """
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a directory")
    _refuse_current_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        make_readable(tmp)  # mkdtemp made it 0700: a checkpoint is a normal, shareable directory
        if replaces is not None and target.exists():
            replaced = replaces(target)
            for entry in target.iterdir():
                if entry.name in replaced or (tmp / entry.name).exists():
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        fsync_path(tmp, directory=True)
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous contents
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        fsync_path(target.parent, directory=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- output directories of commands ---------------------------------------------------------------


class OutputDirectoryError(ValueError):
    """A command's output directory cannot be used: another process is writing it, or it holds files
    that are not this command's own output (the message names them)."""


LOCK_SUFFIX = ".lock"


def _refuse_current_directory(target: Path) -> None:
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        raise OutputDirectoryError(
            f"{target}: is the current directory (or holds it) and cannot be replaced: write into a new "
            "subdirectory instead"
        )


def visible_entries(directory: Path) -> list[str]:
    """Names in `directory`, without the temporaries and locks of this module's writers."""
    return sorted(e.name for e in directory.iterdir() if not is_temporary(e.name) and not _is_lock(directory, e.name))


def _is_lock(directory: Path, name: str) -> bool:
    return name.startswith(".") and name.endswith(LOCK_SUFFIX)


def _listing(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@contextmanager
def claim_directory(
    target: str | os.PathLike, kind: str, replaceable: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Hold the output directory `target` of one command for the duration of the block.

    Refused (`OutputDirectoryError`, before anything is written): `target` is a file; another process
    holds it (an exclusive `flock` on `.NAME.lock` beside it, released when the block ends or the process
    dies); or it exists, is not empty, and `replaceable(target)` does not say it is this command's own
    kind of output (`kind`, used in the message). Yields the absolute path; creates nothing in it.
    """
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise OutputDirectoryError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}{LOCK_SUFFIX}"
    fd = _acquire(lock, target)
    try:
        entries = visible_entries(target) if target.is_dir() else []
        if entries and not (replaceable is not None and replaceable(target)):
            raise OutputDirectoryError(
                f"{target}: is not empty and is not a {kind} (it holds {_listing(entries)}): refusing to write "
                "there; choose a new or empty directory"
            )
        yield target
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: a waiter then finds its file gone and retries
        os.close(fd)


def refuse_overlap(target: str | os.PathLike, inputs: Collection[str | os.PathLike], what: str) -> None:
    """`OutputDirectoryError` where the output `target` is one of `inputs` or holds or lies inside one."""
    target = Path(os.path.realpath(target))
    for source in inputs:
        source = Path(os.path.realpath(source))
        if source == target:
            raise OutputDirectoryError(f"{target}: is {what}: write the output elsewhere")
        if source in target.parents or target in source.parents:
            raise OutputDirectoryError(f"{target}: overlaps {what}, {source} (one holds the other): write the "
                                       "output elsewhere")  # fmt: skip


def _acquire(lock: Path, target: Path) -> int:
    """An fd holding an exclusive flock on the file `lock` (the path's current file, not an unlinked one)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise OutputDirectoryError(
                f"{target}: another process{f' (pid {holder})' if holder else ''} is writing it; wait for it "
                "to finish or choose another directory"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
