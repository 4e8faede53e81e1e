"""Crash-safe files and directories: write under a temporary name, fsync, rename into place.

A reader sees the old file (or directory) or the new one, never half of either; a kill at any point leaves
something `recover_dir` (for directories) puts back, and the next writer removes what dead writers left. The
names and the marker that prove a temporary ours are described above MARKER. Used by every module that
writes a user's file: model directories, checkpoints' exports, prepared data, reports, GGUF files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Optional

from gpt.errors import storage_errors


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Temporary and swap names are ours only when we can prove it: `.<name>.<kind>-<pid>-<uuid>` (kind tmp, new or old)
# for exactly the target's name, created with O_EXCL (a name that exists is never reused), and a directory
# also carries MARKER, which names the target and the same suffix. Cleanup and recovery match these names
# exactly (never a glob built from a user's file name) and touch nothing else: a user's `.X.old`, `.X.new` or
# `.X.tmp-anything` beside our files is left as it is.
MARKER = ".gpt-atomic"


def _new_suffix() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex}"  # the writer's pid: a leftover of a dead one can be told apart


def _own_name(path: Path, kind: str, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{suffix}")


def _parse_own(name: str, target: str, kind: str) -> Optional[tuple[int, str]]:
    """(writer pid, suffix) when `name` is one of our `kind` names for `target`, else None."""
    m = re.fullmatch(re.escape(f".{target}.{kind}-") + r"((\d+)-[0-9a-f]{32})", name)
    return (int(m.group(2)), m.group(1)) if m else None


def _marker_text(target: str, suffix: str) -> str:
    return f"gpt atomic_dir {target} {suffix}\n"


def _write_marker(directory: Path, target: str, suffix: str) -> None:
    (directory / MARKER).write_text(_marker_text(target, suffix))


def _marked(directory: Path, target: str, suffix: str) -> bool:
    """Whether `directory` is a real directory (not a link) that carries our marker for target/suffix."""
    try:
        return (
            not directory.is_symlink()
            and directory.is_dir()
            and (directory / MARKER).read_text() == _marker_text(target, suffix)
        )
    except (OSError, UnicodeDecodeError):
        return False


def _alive(pid: int) -> bool:
    """Whether process `pid` may still be writing (another user's process counts as alive: not ours to judge)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _siblings(path: Path, kind: str) -> list[tuple[Path, int, str]]:
    """Our `kind` names for `path` in its directory: (path, writer pid, suffix), by exact name."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [(path.with_name(n), *own) for n in names if (own := _parse_own(n, path.name, kind))]


def remove_stale_temps(directory: Path, name: str) -> None:
    """Delete what killed writers of `directory`/`name` left: half-written temporary files (our exact name,
    a regular file of this user) and temporary directories (with our marker, or empty). A temporary name
    whose writer is still alive, and anything that merely looks like one, is left alone."""
    for leftover, pid, suffix in _siblings(Path(directory) / name, "tmp"):
        if _alive(pid):
            continue
        with contextlib.suppress(OSError):
            st = leftover.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                leftover.unlink()
            elif _marked(leftover, name, suffix):
                shutil.rmtree(leftover)
            elif stat.S_ISDIR(st.st_mode):
                leftover.rmdir()  # killed before its marker was written: only ever removed when empty


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a binary file opened on a temporary name beside `path`; when the block ends without error, the
    data is fsynced and the file renamed over `path` (one rename: readers see the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = _own_name(path, "tmp", _new_suffix())
    # O_EXCL: never opens a file that is already there; mode 0o666 less the umask, like any file the user writes
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with storage_errors(path):
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a power cut
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def recover_dir(path: str | Path) -> Path:
    """Finish a directory replacement that a kill interrupted (see atomic_dir) and return where the
    directory is: `path`, or a complete sibling if `path` is missing and cannot be renamed back. Only a
    `.new` that carries our marker is adopted."""
    path = Path(path)
    if os.path.lexists(path):
        return path
    complete = sorted(
        ((p, pid) for p, pid, suffix in _siblings(path, "new") if _marked(p, path.name, suffix)),
        key=lambda c: c[0].stat().st_mtime,
    )
    if complete:  # the newest complete new version: it was complete before the swap began
        candidate, pid = complete[-1]
        if _alive(pid):  # its writer is mid-swap: read it where it is, leave the swap to the writer
            return candidate
        try:
            os.replace(candidate, path)
            return path
        except OSError:  # a read-only location: read it where it is
            return candidate
    return path


def _remove_swap_leftovers(path: Path) -> None:
    """After recover_dir: what killed swaps of `path` left. A `.old` is ours when a marker (in `path` or in a
    `.new`) names its suffix; a `.new` beside a present `path` is a swap killed before it began."""
    marks = {_marker_suffix(path)} | {
        suffix for new, _, suffix in _siblings(path, "new") if _marked(new, path.name, suffix)
    }
    for old, pid, suffix in _siblings(path, "old"):
        if suffix in marks and not _alive(pid) and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    for new, pid, suffix in _siblings(path, "new"):
        if _marked(new, path.name, suffix) and not _alive(pid) and path.is_dir():
            shutil.rmtree(new, ignore_errors=True)
    suffix = _marker_suffix(path)
    # a swap killed just before it removed the marker
    if suffix and not _alive(int(suffix.split("-")[0])) and not path.is_symlink():
        (path / MARKER).unlink(missing_ok=True)


def _marker_suffix(directory: Path) -> Optional[str]:
    """The suffix our marker in `directory` names, if it carries one for its own name."""
    try:
        text = (directory / MARKER).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    m = re.fullmatch(r"gpt atomic_dir (.+) (\d+-[0-9a-f]{32})\n", text, flags=re.S)
    return m.group(2) if m and m.group(1) == directory.name else None


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory beside `path`; on success it replaces `path`.

    POSIX cannot swap two directories in one rename, so the replacement is staged: the finished (and
    fsynced) temporary directory is renamed to .<name>.new-<id>, the current one to .<name>.old-<id>, then
    .new-<id> to <name>. A kill at any point leaves <name> or a complete .new-<id>/.old-<id> beside it, and
    `recover_dir` (which readers and the next writer call) puts the newest complete one back at <name>. The
    marker file inside (MARKER, naming <name> and <id>) is what proves these names ours; it is removed from
    <name> when the swap is done.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    remove_stale_temps(path.parent, path.name)
    _remove_swap_leftovers(path)
    suffix = _new_suffix()
    tmp, new, old = (_own_name(path, kind, suffix) for kind in ("tmp", "new", "old"))
    os.mkdir(tmp, 0o777)  # fails if the name exists; the mode is 0o777 less the umask, like any directory
    try:
        _write_marker(tmp, path.name, suffix)
        with storage_errors(path):
            yield tmp
            _write_marker(tmp, path.name, suffix)  # again: what the block copied in may have replaced it
            for f in tmp.rglob("*"):
                if f.is_file():
                    # safetensors (and so PEFT) writes through a private temporary file: make the result
                    # readable like any file the user's umask allows, as config.json and tokenizer.json are
                    os.chmod(f, 0o666 & ~_umask())
                    _fsync(f)
            _fsync(tmp)
        os.replace(tmp, new)
        if os.path.lexists(path):
            os.replace(path, old)
        os.replace(new, path)
        _fsync(path.parent)
        if os.path.lexists(old):
            shutil.rmtree(old, ignore_errors=True)
        (path / MARKER).unlink(missing_ok=True)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def copy_atomically(src: Path, dst: Path) -> None:
    """Copy a file or a directory to `dst`, replacing it the atomic way (see atomic_file / atomic_dir)."""
    if src.is_dir():
        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    else:
        with atomic_file(dst) as f, open(src, "rb") as source:
            shutil.copyfileobj(source, f)
