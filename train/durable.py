"""Making a directory survive a power cut: fsync its files, then the directory, then the rename.

A rename is atomic, but without fsync a crash right after it can leave the new name pointing at
files whose data never reached the disk (ext4 and XFS write data and metadata back separately).
So a commit is: fsync every file in the directory, fsync the directory (its entries), rename it
into place, fsync the parent (the rename itself). Used for checkpoints and for output_dir/final/.
"""
from __future__ import annotations

import os
from pathlib import Path


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


def commit_rename(src: Path, dst: Path) -> None:
    """Rename a finished, fsynced directory into place and make the rename itself durable."""
    os.rename(src, dst)
    fsync_path(dst.parent)
