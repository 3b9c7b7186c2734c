"""output_dir belongs to the run: a marker says so, and a directory without one is never used.

    output_dir/.slurm-lm-run.json   {"format": 1, "created": "2026-12-03T09:50:00+00:00"}

A run deletes and replaces files in its output_dir (metrics.jsonl restarted, checkpoints pruned,
final/ replaced), so it must only ever do that in a directory it made. The marker is written at
the first start (by rank 0, or by the launcher before it submits, since the job's log folder goes
there); from then on the directory is a run directory. Before that, `check` (called by preflight,
so the launcher refuses too, before the queue) accepts only a directory that is absent, empty, or
holds nothing but what a starting run writes itself, whatever resume and overwrite_output_dir
say: a user's `notes.tex` or another tool's `metrics.jsonl` is refused by name. A directory
written by a version before the marker is recognised by its complete checkpoint and the run's
own names. Places that are never an output_dir: /, the home directory, a data directory, and
the current directory when it holds anything else.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

from train import durable
from train.errors import UsageError

MARKER = ".slurm-lm-run.json"
# written by the ranks of a starting run, possibly before rank 0 has written the marker
STARTING = (".lock", ".watchdog", ".node-health", ".rendezvous-")
# a run directory's own names, in the versions before the marker
RUN_NAMES = {"checkpoints", "metrics.jsonl", "metrics.png", "final", ".final.tmp", "logs",
             "tensorboard", "requeues.jsonl", *STARTING}


def is_marked(out: Path) -> bool:
    return (Path(out) / MARKER).is_file() and not (Path(out) / MARKER).is_symlink()


def check(out: Path, data_dirs: list[Path] = ()) -> None:
    """Refuse an output_dir that is not this project's to write in (UsageError, exit 2)."""
    out = Path(out)
    here = out.resolve()
    never = {Path("/"): "the root directory", Path.home().resolve(): "your home directory"}
    if here in never:
        raise UsageError(f"output_dir {out} is {never[here]}: a run deletes and replaces files "
                         f"in its output_dir; give it a directory of its own (runs/NAME)")
    for data in data_dirs:
        if here == Path(data).resolve():
            raise UsageError(f"output_dir {out} is the data directory {data}: give the run a "
                             f"directory of its own (runs/NAME)")
    if out.is_symlink() and not out.exists():
        raise UsageError(f"output_dir {out} is a link to {os.readlink(out)}, which does not "
                         f"exist: remove the link or point output_dir elsewhere")
    if not out.is_dir():
        return
    entries = sorted(os.listdir(out))
    for name in entries:  # what the run writes must not lead elsewhere
        if (name in RUN_NAMES or name == MARKER) and (out / name).is_symlink():
            durable.refuse_link(out / name, "output_dir entry")
    if is_marked(out):
        return
    if not entries:
        return
    foreign = [e for e in entries if not e.startswith(STARTING)]
    if not foreign or made_before_the_marker(out, entries):
        return
    where = ("the current directory, which holds other files" if here == Path.cwd().resolve()
             else "not empty and not a run directory (no " + MARKER + ")")
    raise UsageError(f"output_dir {out} is {where}: it holds {out / foreign[0]}"
                     f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which a "
                     f"run did not write and could delete or overwrite; choose a new or empty "
                     f"output_dir (whatever resume and overwrite_output_dir say)")


def made_before_the_marker(out: Path, entries: list[str]) -> bool:
    """A run directory of a version that wrote no marker: only the run's own names, and a
    complete checkpoint among them."""
    from train.run import checkpoint  # the checkpoint layout's owner

    return set(entries) <= RUN_NAMES | {e for e in entries if e.startswith(STARTING)} and \
        bool(checkpoint.complete_checkpoints(out))


def mark(out: Path) -> None:
    """Make output_dir (if needed) and mark it a run directory, once; call after `check`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_marked(out):
        return
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    durable.write_json(out / MARKER, {"format": 1, "created": created}, indent=1)
