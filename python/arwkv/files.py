"""Writing outputs so that a reader never sees half of one: everything arwkv writes (checkpoints,
converted students, reports, plots, logs rewritten on resume) goes to a temporary name beside its
destination, is flushed to disk, and is renamed into place. Modes follow the user's umask, as for
any file the user creates (Python's tempfile would make them private: 0600 / 0700)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the user's umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


def fsync_tree(directory: Path, files: bool = True) -> None:
    """fsync a directory's files (when ``files``) and the directory itself, so that what was
    renamed into place is complete on disk after a power loss, not only after a killed process."""
    for f in directory.iterdir() if files else ():
        if f.is_file():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_name(final: Path) -> Path:
    """The temporary sibling that ``final`` is written as: ``.NAME.partial-PID``."""
    return final.parent / f".{final.name}.partial-{os.getpid()}"


def remove_stale_partials(directory: Path) -> None:
    """Removes what a killed writer left in ``directory`` (``.*.partial-*`` entries)."""
    if not directory.is_dir():
        return
    for stale in directory.glob(".*.partial-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes ``data`` (text as UTF-8) to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yields an empty temporary directory beside ``final``; when the block ends without error,
    its files get the umask's mode (some writers, e.g. safetensors, make them private), are
    fsynced, and it is renamed to ``final`` (an existing ``final`` is removed only then, and only
    when ``replace``). On error the temporary directory is removed, so a failure never leaves a
    directory that looks complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o777)  # the umask applies
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, file_mode())
        fsync_tree(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} exists")
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_tree(final.parent, files=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
