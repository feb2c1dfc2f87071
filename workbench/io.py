"""Atomic file output: a crash, a kill or a full disk never leaves a half-written file under a final name.

Every writer here writes a temporary file beside the destination (same directory, so the rename is
atomic on one file system), flushes and fsyncs it, renames it over the destination and fsyncs the
directory. Temporary names carry the writing process id (`.<name>.wbtmp-<pid>-<random><suffix>`), so
`sweep_leftovers` can tell the leftovers of a dead process from the files a live one is writing.
Files and folders are created with the user's normal permissions (0666 / 0777 minus the umask), not
the owner-only modes of `tempfile`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import pandas as pd

TEMP_MARK = "wbtmp"
_TEMP_NAME = re.compile(rf"^\.(?P<name>.+)\.{TEMP_MARK}-(?P<pid>\d+)-(?P<token>[0-9a-f]+)(?P<suffix>\.[A-Za-z0-9.]+)?$")
SPACE_MARGIN_BYTES = 16 * 2**20  # kept free beyond a write's own size (metadata, logs, other writers)


class InsufficientSpaceError(OSError):
    """Not enough free space for a write; the message names the folder, the sizes and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def free_bytes(directory: Path) -> int:
    """Free bytes available to this user on the file system of `directory` (or its nearest existing parent)."""
    directory = Path(directory)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def ensure_free_space(directory: Path, nbytes: int, what: str, margin: int | None = None) -> None:
    """Raise InsufficientSpaceError before writing `nbytes` of `what` into `directory` when they will not fit.

    `margin` is the headroom kept free beyond the write: by default a tenth of it plus 64 KiB, at
    most SPACE_MARGIN_BYTES.
    """
    if margin is None:
        margin = min(SPACE_MARGIN_BYTES, nbytes // 10 + 2**16)
    free = free_bytes(directory)
    if nbytes + margin > free:
        raise InsufficientSpaceError(
            f"not enough free space in {directory} to write {what}: it needs about {_mib(nbytes)} "
            f"(plus {_mib(margin)} headroom) but only {_mib(free)} are free; free some space or write elsewhere"
        )


def _out_of_space(exc: BaseException | None) -> bool:
    """Whether an error, or one it was raised while handling, is ENOSPC/EDQUOT (libraries rewrap it)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _space_error(path: Path, exc: BaseException) -> BaseException:
    """A clear error for ENOSPC/EDQUOT raised while writing `path` (other errors are returned unchanged)."""
    if _out_of_space(exc) and not isinstance(exc, InsufficientSpaceError):
        return InsufficientSpaceError(
            f"the disk holding {path.parent} filled up while writing {path.name}; nothing was written under "
            f"{path.name} (an earlier version, if any, is unchanged). Free some space and run again"
        )
    return exc


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh temporary name beside `path` that records this process id."""
    path = Path(path)
    return path.with_name(f".{path.name}.{TEMP_MARK}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def create_temp_file(path: Path, suffix: str = ".tmp") -> Path:
    """Create an empty temporary file beside `path` (mode 0666 minus the umask) and return its name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_name(path, suffix)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def append_line(handle: BinaryIO, line: str) -> None:
    """Append one UTF-8 line to a file open in "a+b" mode, then flush and fsync it.

    A last line left without its line end (a writer killed mid-line) is closed first, so the torn
    line cannot swallow this one; readers then skip the torn line alone.
    """
    prefix = b""
    end = handle.seek(0, os.SEEK_END)
    if end > 0:
        handle.seek(end - 1)
        if handle.read(1) != b"\n":
            prefix = b"\n"
        handle.seek(0, os.SEEK_END)
    handle.write(prefix + line.encode("utf-8") + b"\n")
    handle.flush()
    os.fsync(handle.fileno())


def append_line_to(path: Path, line: str) -> Path:
    """Append one line to the file at `path` (created when missing, its folder fsynced then) durably."""
    path = Path(path)
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        append_line(handle, line)
    if created:
        fsync_path(path.parent)
    return path


def commit_temp(tmp: Path, path: Path) -> Path:
    """fsync a finished temporary file, rename it over `path` and fsync the directory."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp", verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a library to write; it becomes `path` only when complete.

    `verify(tmp)` runs before the rename (for example reopening a GeoTIFF) and may raise to keep a bad
    file from its final name. On any error the temporary file is removed and `path` keeps what it held.
    """
    path = Path(path)
    tmp = create_temp_file(path, suffix)
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        commit_temp(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = _space_error(path, exc)
        if error is exc:
            raise
        raise error from exc


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(path.parent, len(data), str(path.name))
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Atomic text write (UTF-8)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_parquet_atomic(path: Path, frame: pd.DataFrame, index: bool = False) -> Path:
    """Atomic Parquet write of a DataFrame (the row index is written only with `index`)."""
    data = frame.to_parquet(index=index)
    if data is None:  # pandas returns the bytes when no path is given
        raise RuntimeError(f"pandas wrote no Parquet bytes for {path}")
    return write_bytes_atomic(path, data)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def write_json_atomic(path: Path, data: Any) -> Path:
    """Atomic JSON write; numpy scalars and arrays are converted."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file with an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _old_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


@contextmanager
def atomic_directory(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `dest` only when the block succeeds.

    The folder is named `.<dest>.wbtmp-<pid>-<random>.partial`; leftovers of interrupted writers (and a
    `dest` caught half-way through its replacement) are cleaned up first, see `sweep_leftovers`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(dest.parent, only=dest.name)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; remove it or choose another destination")
    tmp = temp_name(dest, ".partial")
    os.mkdir(tmp, 0o777)  # the umask applies, unlike tempfile.mkdtemp's 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(tmp)
    if dest.exists():
        old = _old_name(dest)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        fsync_path(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
        fsync_path(dest.parent)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@dataclass
class Leftovers:
    """What `sweep_leftovers` found: removed (their writer is gone), restored and kept (a live writer's)."""

    removed: list[Path] = field(default_factory=list)
    restored: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a log or a notebook (empty when nothing was found)."""
        parts = []
        if self.removed:
            parts.append(
                f"removed {len(self.removed)} leftover(s) of interrupted writes: "
                + ", ".join(p.name for p in self.removed)
            )
        if self.restored:
            parts.append("restored " + ", ".join(str(p) for p in self.restored) + " from an interrupted replacement")
        if self.kept:
            parts.append(f"{len(self.kept)} temporary file(s) of running processes left alone")
        return "; ".join(parts)


def sweep_leftovers(directory: Path, recursive: bool = False, only: str | None = None) -> Leftovers:
    """Remove the temporary files and `.partial` folders of writers that died, in `directory`.

    Temporary names record their writer's process id; those of a process that no longer runs are
    removed, those of a live process are kept and reported. A folder whose replacement was cut
    between its two renames (only `.<name>.old` left) is renamed back. `only` limits the sweep to
    leftovers of one destination name.
    """
    found = Leftovers()
    directory = Path(directory)
    if not directory.is_dir():
        return found
    entries = directory.rglob(".*") if recursive else directory.glob(".*")
    for entry in sorted(entries):
        match = _TEMP_NAME.match(entry.name)
        if match is not None:
            if only is not None and match["name"] != only:
                continue
            if _alive(int(match["pid"])):
                found.kept.append(entry)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            found.removed.append(entry)
        elif entry.name.endswith(".old") and entry.is_dir() and entry.name.startswith("."):
            name = entry.name[1:-4]
            if only is not None and name != only:
                continue
            original = entry.with_name(name)
            if not original.exists():
                os.replace(entry, original)
                found.restored.append(original)
            else:  # the replacement finished but removing the old copy did not
                shutil.rmtree(entry, ignore_errors=True)
                found.removed.append(entry)
    return found


# --------------------------------------------------------------------------- notebooks written by papermill

ATOMIC_NOTEBOOK_SCHEME = "wb-atomic://"


class AtomicNotebookHandler:
    """A papermill I/O handler for `wb-atomic://<path>`: every save of the notebook is an atomic write.

    papermill saves the output notebook after cells as it executes; through this handler each save
    replaces the file whole, so the notebook under its final name is always a complete notebook
    (the last saved state), never a truncated one.
    """

    @staticmethod
    def _local(path: str) -> Path:
        return Path(path[len(ATOMIC_NOTEBOOK_SCHEME) :])

    def read(self, path: str) -> str:
        return self._local(path).read_text(encoding="utf-8")

    def write(self, buf: str, path: str) -> None:
        write_text_atomic(self._local(path), buf)

    def listdir(self, path: str) -> list[str]:
        return [ATOMIC_NOTEBOOK_SCHEME + str(p) for p in self._local(path).iterdir()]

    def pretty_path(self, path: str) -> str:
        return str(self._local(path))


def atomic_notebook_target(path: Path) -> str:
    """The papermill output path that makes every save of the notebook at `path` atomic."""
    from papermill.iorw import papermill_io

    if not any(scheme == ATOMIC_NOTEBOOK_SCHEME for scheme, _ in papermill_io._handlers):
        papermill_io.register(ATOMIC_NOTEBOOK_SCHEME, AtomicNotebookHandler())
    return ATOMIC_NOTEBOOK_SCHEME + str(Path(path).resolve())
