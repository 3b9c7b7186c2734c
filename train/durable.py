"""Files written whole, fresh and durable: never through a link, never half-written.

Two guarantees, for every file the project writes (shards, index.json, checkpoints, exports,
metrics, locks):
- **Fresh.** A file is written under a temporary name in its own directory, created with
  O_EXCL | O_NOFOLLOW (so a symbolic link placed there by anyone is never written through: the
  old name is unlinked first, which removes the link, not its target), then renamed over the
  final name (a rename replaces a link, it never follows it). An append (metrics.jsonl) opens
  with O_NOFOLLOW and is refused on a link. Files get 0o666 and directories 0o777, less the
  umask, as `open` and `mkdir` would give them: a team sharing a project directory can read them.
- **Durable.** A rename is atomic, but without fsync a crash right after it can leave the new
  name pointing at files whose data never reached the disk (ext4 and XFS write data and metadata
  back separately). So a commit is: fsync every file, fsync the directory (its entries), rename
  it into place, fsync the parent (the rename itself). Used for checkpoints and output_dir/final/.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from train.errors import UsageError

FILE_MODE, DIR_MODE = 0o666, 0o777  # before the umask, as open() and mkdir() use them


def current_umask() -> int:
    """The process's umask (reading it means setting it: set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give a file or directory made with a private mode (mkstemp's 0600, mkdtemp's 0700) the
    mode the umask says, so that it reads as if made by open() or mkdir()."""
    mode = DIR_MODE if Path(path).is_dir() else FILE_MODE
    os.chmod(path, mode & ~current_umask())


def refuse_link(path: Path, what: str = "file") -> None:
    """A UsageError when path is a symbolic link: the project never writes through one."""
    if Path(path).is_symlink():
        raise UsageError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); the "
                         f"project never writes through a link: remove it, or choose another "
                         f"directory")


def create_fresh(path: Path, binary: bool = True):
    """A new, empty file at path, opened for writing: whatever was at path (a stale temporary
    file, or a link) is unlinked first, and O_EXCL | O_NOFOLLOW make sure the file opened is the
    one just created. The mode is 0o666 less the umask."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    return os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8")


@contextlib.contextmanager
def written_whole(path: Path, binary: bool = False, fsync: bool = True):
    """`with written_whole(path) as f: f.write(...)`: written under `path.tmp`, fsynced (unless
    fsync=False: a heartbeat rewritten every few seconds) and renamed over path only when the
    block ends without an error (then the temporary file goes)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    f = create_fresh(tmp, binary)
    try:
        with f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, fsync: bool = True) -> None:
    with written_whole(path, fsync=fsync) as f:
        f.write(text)


def write_json(path: Path, obj, **dump_options) -> None:
    """JSON written whole: readers see the old file or the new one."""
    with written_whole(path) as f:
        json.dump(obj, f, **dump_options)
        f.write("\n")


def copy_file(src: Path, dst: Path) -> None:
    """Copy a file's bytes into a fresh dst (never through a link at dst)."""
    with open(src, "rb") as source, written_whole(dst, binary=True) as f:
        shutil.copyfileobj(source, f)


def open_append(path: Path):
    """Open a log for appending, created if absent; a symbolic link at path is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError as err:
        if err.errno == errno.ELOOP:
            refuse_link(path)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def remove_tree(path: Path) -> None:
    """Remove a directory the project wrote, or a link in its place (the link only: never what
    it points at)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def fresh_dir(path: Path) -> Path:
    """An empty directory at path, made now: whatever was there (a killed attempt's directory,
    or a link) is removed first, so that nothing is written into a directory elsewhere."""
    remove_tree(path)
    path.mkdir(mode=DIR_MODE)
    return path


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory is opened read-only: Linux allows its fsync)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under root, then every directory bottom up (root last)."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(Path(here))
        for name in files:
            fsync_path(Path(here) / name)
    for d in reversed(dirs):
        fsync_path(d)


def seal_tree(root: Path) -> None:
    """Before a directory's commit: everything under root gets the umask's mode (safetensors
    writes its files 0600, unreadable to a team sharing the project), then is fsynced."""
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            apply_umask(Path(here) / name)
    apply_umask(root)
    fsync_tree(root)


def commit_rename(src: Path, dst: Path) -> None:
    """Rename a finished, fsynced directory into place and make the rename itself durable."""
    os.rename(src, dst)
    fsync_path(dst.parent)


# A write that failed for want of room or of a writable file system: errors the user fixes on
# the machine (free space, remount), reported in one line, never a traceback.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def read_only(path: Path) -> bool:
    """Is path (or its nearest existing parent) on a file system mounted read-only?"""
    path = existing_parent(path)
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def is_storage_failure(err: BaseException, where: Path, needed: int | None) -> bool:
    """Was this failure a full or read-only file system? An OSError says so by its errno,
    safetensors by the OS's words in its message; torch's zip writer says only "file write
    failed" (a RuntimeError), so then the file system is asked: it is read-only, or holds less
    than what the write needed."""
    if isinstance(err, OSError):
        return err.errno in STORAGE_ERRNOS
    if any(os.strerror(code) in str(err) for code in STORAGE_ERRNOS):
        return True
    return read_only(where) or (needed is not None and free_bytes(where) < needed)


def storage_message(what: str, err: BaseException, where: Path, needed: int | None,
                    then: str) -> str:
    """One line: what failed, on which path, the bytes needed and free, and what to do."""
    path = getattr(err, "filename", None) or where
    free = free_bytes(where)
    need = f"needs about {needed / 1e6:.1f} MB, " if needed else ""
    if (isinstance(err, OSError) and err.errno == errno.EROFS) or read_only(where):
        return (f"{what}: {path} is on a read-only file system ({need}{free / 1e6:.1f} MB free "
                f"there); remount it read-write or choose another output_dir; {then}")
    return (f"{what}: no space left on device writing {path} ({need}{free / 1e6:.1f} MB free on "
            f"{existing_parent(where)}); free space and rerun the same command; {then}")
