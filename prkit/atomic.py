"""Writing files whole: a temporary file beside the target, synced and renamed over it, so that a crash, an
interrupt or a power loss leaves the old file or the new one, never half of one; a full disk named with the file
and the space left; the temporary files of killed writers cleaned up.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .checks import nearest_existing, not_a_folder

ABANDONED_AFTER = 3600.0  # seconds without a change after which a dead writer's temporary file is removed
_TEMPORARY = re.compile(r"\.(.+)\.(\d+)\.[0-9a-f]{8}\.tmp")  # atomic_path's names: .<target>.<pid>.<8 hex>.tmp
_LONG_NAME = 200  # bytes of a target name past which its temporary files carry a hash of it (names end at 255)


def _stem(name: str) -> str:
    """What a temporary file beside ``name`` is called after: the name, or for a long one (the temporary's ~24 more
    bytes would pass the file system's 255) a hash of it."""
    if len(os.fsencode(name)) <= _LONG_NAME:
        return name
    return "~" + hashlib.blake2b(os.fsencode(name), digest_size=12).hexdigest()
_ABANDONED: dict[Path, dict[str, list[Path]]] = {}  # folder -> target name -> its abandoned temporary files


def _remove_abandoned(path: Path) -> None:
    """Remove the temporary files that killed writers (SIGKILL, power loss) left beside ``path``: those whose
    process is gone and that have not changed for ``ABANDONED_AFTER`` seconds (a writer on another machine of a
    shared folder is never that slow). Anything unclear is left alone. The folder is listed once per process (a
    sample run writes many files into one folder), each target's leftovers removed at its own first write."""
    folder = path.parent.resolve()
    if folder not in _ABANDONED:
        found: dict[str, list[Path]] = {}
        now = time.time()
        for tmp in folder.glob(".*.tmp"):
            match = _TEMPORARY.fullmatch(tmp.name)
            try:
                if (match is None or int(match.group(2)) == os.getpid() or _alive(int(match.group(2)))
                        or now - tmp.stat().st_mtime < ABANDONED_AFTER):
                    continue
            except OSError:
                continue
            found.setdefault(match.group(1), []).append(tmp)
        _ABANDONED[folder] = found
    for tmp in _ABANDONED[folder].pop(_stem(path.name), []):
        try:
            tmp.unlink()
        except OSError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else (EPERM)
        return True
    return True


def _sync(path) -> None:
    """fsync a file or a folder; where the system cannot (a folder on Windows, some network mounts), skip it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; when the block ends without error it replaces ``path`` in one
    rename, so a crash or an interrupt never leaves half a file (and never loses the old one). With
    ``replace=False`` a ``path`` that exists by then (another process wrote it meanwhile) is left as it is and
    FileExistsError is raised: the name is claimed (created exclusively) just before the rename. The file ends with
    the mode any new file gets there (0666 through the umask and the folder's default ACL; mkstemp's are 0600),
    read from the temporary file as created, without changing the process's umask. Temporary files that killed
    writers left beside ``path`` are removed first (``_remove_abandoned``). The file is synced to disk before the
    rename and the folder after it, so a power loss leaves the old file or the new one, whole. ``~`` is expanded; a
    symbolic link is written through (its target replaced, the link kept)."""
    path = Path(path).expanduser()
    if path.is_symlink():  # replacing the link itself would leave it a plain file and its target as it was
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; give a file name inside it")
    blocker = nearest_existing(path.parent)
    if not blocker.is_dir():  # mkdir said "File exists" or "Not a directory", naming neither it nor what to do
        raise NotADirectoryError(f"cannot write {str(path)!r}: {not_a_folder(blocker)}; choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    tmp = str(path.parent / f".{_stem(path.name)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = os.stat(tmp).st_mode  # what a new file gets here; a writer may replace the file with a 0600 one
    try:
        yield tmp
        try:
            os.chmod(tmp, mode)
        except OSError:  # a file system without modes (FAT, some network mounts): keep what it gave
            pass
        _sync(tmp)  # the bytes are on disk before the name points at them (else a power loss can leave it empty)
        if not replace:  # raises FileExistsError for a file that is someone else's; the empty claim lasts a rename
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, path)
        _sync(path.parent)  # and the rename itself
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _free_mib(path: Path) -> float | None:
    """The MiB free on the file system of ``path`` (of its nearest existing folder), None where unknown."""
    try:
        return shutil.disk_usage(nearest_existing(path.parent)).free / 2 ** 20
    except OSError:
        return None


def write_error(path: Path, exc: OSError, kept: str | None = None) -> OSError:
    """The error to raise when writing ``path`` failed with ``exc``: it names the file, the cause and the MiB free
    on the file system, and what to do (the same errno, so a full disk still reads as ENOSPC). ``kept``: what was
    written all the same, said last (default: whether the file that was there is unchanged)."""
    free = _free_mib(path)
    room = f"{free:.0f} MiB free there" if free is not None else "free space unknown"
    full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    todo = ("free some space or write to another disk, then try again" if full else
            "check that the folder is writable and has room, then try again")
    if kept is None:
        kept = "The file that was there is unchanged" if path.exists() else "Nothing was written"
    return reworded(exc, f"could not write {path}: {exc.strerror or exc} ({room}); {todo}. {kept}")


def reworded(exc: OSError, text: str) -> OSError:
    """An OSError saying ``text`` with ``exc``'s errno (a full disk still reads as ENOSPC)."""
    return OSError(exc.errno, text) if exc.errno else OSError(text)


class _Recording:
    """A binary file that remembers the OSError its write raised: torch.save turns a full disk into a RuntimeError
    (``unexpected pos``) that does not say so."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[_Recording]:
    """An open binary file whose bytes replace ``path`` in one rename when the block ends (``atomic_path``). A
    failed write (a full disk, a quota, a lost mount), also one the writer reports as its own error (torch.save's
    RuntimeError), raises ``write_error``: the file and the space left named, the old file kept whole, no
    temporary file left."""
    path = Path(path).expanduser()
    file = None
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as raw:
            file = _Recording(raw)
            yield file
    except (IsADirectoryError, NotADirectoryError):  # atomic_path's own, already clear
        raise
    except Exception as err:
        cause = err if isinstance(err, OSError) else getattr(file, "error", None)
        if cause is None:
            raise
        raise write_error(path, cause) from err
