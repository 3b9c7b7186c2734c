"""Checkpoints that are whole or absent, durable, and readable without pickle.

    output_dir/checkpoints/step-00000100/   complete: DeepSpeed state, trainer_state.json, RNG
    output_dir/checkpoints/.partial-step-00000200/   a save in progress (or killed): ignored
    output_dir/checkpoints/previous-run/    overwrite_output_dir: the replaced run's, until the
                                            new run's first checkpoint is complete

Every rank writes its part into the `.partial-` directory (DeepSpeed's save is collective) and its
own RNG state; after a barrier, rank 0 writes trainer_state.json (loader position, step, the
resolved config, the data's identity), fsyncs the files and the directory, and renames it, one
atomic rename on a POSIX file system, itself fsynced (train/durable.py). A crash anywhere before
that rename leaves the previous checkpoint the latest complete one; old ones are pruned only
after a new one is complete. A later run that holds the output_dir's lock removes the partial
directories a killed save left (`take_over`).

Our own state is JSON (trainer_state.json) and safetensors (rng-rankN.safetensors: the torch
CPU and CUDA generators, numpy's and python's streams), so nothing of ours is unpickled. The
DeepSpeed files (`*_model_states.pt`, `*_optim_states.pt`) are DeepSpeed's pickles, loaded by
DeepSpeed: a checkpoint directory must be trusted. RNG state in the older pickled format
(`rng-rankN.pt`) is not loaded: such a checkpoint resumes with streams reseeded, with a note.

Resuming under a different number of ranks: ZeRO's optimizer state is partitioned by rank, so
the checkpoint is converted once with DeepSpeed's `ds_to_universal` (into `step-N/universal/`)
and loaded with `checkpoint.load_universal`; the other ranks wait for the conversion in a barrier
of their own with a timeout sized to the checkpoint (`convert_for_world_size`).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from train import durable
from train.errors import FAULT_EXIT_CODE, StorageError, note, warn
from train.data.shards import file_sha256

STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # each file's size and sha256 at commit: what resume verifies
NAME = re.compile(r"^step-(\d{8})$")
PARTIAL = ".partial-"
SET_ASIDE = "previous-run"
DAMAGED = "damaged-"  # a checkpoint found damaged at a resume, kept for inspection, never used
RNG_FILE = re.compile(r"^rng-rank\d+\.safetensors$")


def root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(output_dir) -> list[Path]:
    r = root(output_dir)
    if not r.is_dir():
        return []
    found = [p for p in r.iterdir() if NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def latest(output_dir) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's random streams as tensors and JSON text: stored with safetensors, so a
    checkpoint of ours never needs pickle to be read."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"python": json.dumps([version, list(mt), gauss]),
            "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)])}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    version, mt, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(mt), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rng_file(path: Path, rank: int) -> Path:
    return path / f"rng-rank{rank}.safetensors"


def save_rng(path: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors, meta = rng_state()
    save_file(tensors, rng_file(path, rank), metadata=meta)
    durable.fsync_path(rng_file(path, rank))


def load_rng(path: Path, rank: int) -> bool:
    """Restore this rank's streams; False when the checkpoint has none readable without pickle
    (saved by another world size, or by a version that pickled them: `rng-rank*.pt`, which is
    deliberately not opened)."""
    from safetensors import safe_open

    file = rng_file(path, rank)
    if not file.exists():
        if (path / f"rng-rank{rank}.pt").exists():
            if rank == 0:
                note(f"{path} keeps its RNG state in the old pickled format, which is not "
                     f"loaded; the random streams restart from the seed (resume is not "
                     f"bit-exact where dropout or masking draws)")
        else:
            warn(f"{file} is missing: rank {rank}'s random streams restart from the seed, so "
                 f"dropout and masking draw differently than an uninterrupted run would (the "
                 f"data order and the model state are unaffected)")
        return False
    with safe_open(file, framework="pt") as f:
        set_rng_state({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return True


FAILED, FULL_OR_READ_ONLY = 1, 2  # agree()'s codes, max-reduced: a storage failure wins


def save(engine, output_dir, step: int, trainer_state: dict, rank: int, barrier,
         keep: int | None = None, crash_before_commit: bool = False, agree=None,
         needed: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the complete checkpoint's path.

    A failure on any rank (a full disk, a read-only file system) is agreed on by all of them:
    agree(code) max-reduces an int over the ranks where a barrier would stand, so no rank waits
    in a collective the failed one never reaches. Then the partial directory goes, the previous
    checkpoint stays the latest, and every rank raises (StorageError for a full or read-only file
    system: one line with the path, the bytes `needed` and the bytes free). DeepSpeed's
    save_checkpoint ends in a barrier after its writes: a rank whose write failed inside it
    enters that barrier itself before agreeing."""
    if agree is None:  # one rank (the unit tests): a barrier, and only this rank's failure
        def agree(code: int) -> int:
            barrier()
            return code
    r = root(output_dir)
    final = r / name(step)
    partial = r / f"{PARTIAL}{name(step)}"
    failure: list[BaseException] = []

    def attempt(fn, *args):
        if failure:
            return
        try:
            fn(*args)
        except Exception as err:  # agreed on below, then raised on every rank
            failure.append(err)

    def agreed() -> None:
        local = 0
        if failure:
            storage = durable.is_storage_failure(failure[0], r, needed)
            local = FULL_OR_READ_ONLY if storage else FAILED
        code = agree(local)
        if code:
            fail(code)

    def fail(code: int) -> None:
        if rank == 0:
            try:
                durable.remove_tree(partial)  # frees the space; on a read-only fs it stays
            except OSError:
                pass
        kept = latest(output_dir)
        then = (f"{kept} is still the latest checkpoint" if kept else
                "no checkpoint was saved yet")
        what = f"checkpoint save at step {step}"
        if failure and durable.is_storage_failure(failure[0], r, needed):
            message = durable.storage_message(what, failure[0], r, needed, then)
            failure.clear()  # its frames may hold the failed file open: let it close now
            raise StorageError(message) from None
        if failure:
            raise failure[0]
        message = f"{what} failed on another rank (its error line says why); {then}"
        raise StorageError(message) if code == FULL_OR_READ_ONLY else RuntimeError(message)

    if rank == 0:
        attempt(lambda: (r.mkdir(parents=True, exist_ok=True), durable.fresh_dir(partial)))
    agreed()
    try:
        engine.save_checkpoint(str(r), tag=partial.name, save_latest=False)
    except Exception as err:
        failure.append(err)
        barrier()  # the one DeepSpeed's save ends with, where the other ranks wait
    attempt(save_rng, partial, rank)
    agreed()
    if rank == 0:
        if crash_before_commit:  # fault injection for the tests: a kill mid-save
            os._exit(FAULT_EXIT_CODE)

        def commit():
            durable.write_json(partial / STATE, trainer_state, indent=1)
            write_manifest(partial)
            # Every rank's files were closed before the barrier; one page cache on one node (and
            # close-to-open on NFS) makes rank 0's fsync of the whole tree cover them.
            durable.seal_tree(partial)
            # the same step saved again (a resumed run): replace it whole
            durable.remove_tree(final)
            durable.commit_rename(partial, final)
        attempt(commit)
    agreed()
    if rank == 0:
        print(f"checkpoint {final} saved", file=sys.stderr, flush=True)
        drop_set_aside(output_dir)  # the previous run's, now that this run has one of its own
        if keep:
            for old in complete_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def write_manifest(path: Path) -> None:
    """Rank 0, once every rank's files are closed: each file's size and sha256."""
    files = {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f.name != MANIFEST}
    durable.write_json(path / MANIFEST, {"files": files}, indent=1)


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint (the damaged file, named), or None. A checkpoint
    saved before manifests has only its trainer_state.json checked. A missing RNG file is not
    damage: resume warns and reseeds those streams (load_rng)."""
    try:
        if not isinstance(json.loads((path / STATE).read_text()), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return f"{path / STATE} is not readable ({err})"
    if not (path / MANIFEST).exists():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        expected = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{path / MANIFEST} is not readable ({err})"
    for name, (size, sha256) in expected.items():
        f = path / name
        if not f.is_file():
            if RNG_FILE.match(f.name):
                continue
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size} bytes, {size} when saved"
        if file_sha256(f) != sha256:
            return f"{f} fails its sha256 checksum"
    return None


def latest_good(output_dir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The latest complete checkpoint that verifies, and the newer ones that do not (each with
    what is wrong with it)."""
    damaged = []
    for path in reversed(complete_checkpoints(output_dir)):
        why = damage(path)
        if why is None:
            return path, damaged
        damaged.append((path, why))
    return None, damaged


def set_damaged_aside(paths: list[Path]) -> None:
    """Rank 0, holding the lock: rename damaged checkpoints out of the `step-N` names, so that
    neither a later resume nor pruning (which keeps the newest names) counts them: pruning must
    never delete the last good checkpoint to keep a damaged one."""
    for path in paths:
        if path.exists():
            os.rename(path, path.with_name(DAMAGED + path.name))


def take_over(output_dir, set_aside: bool) -> None:
    """Rank 0 of a run that holds output_dir's lock: remove the partial saves of a killed earlier
    run, and with overwrite_output_dir set the previous run's checkpoints aside."""
    clean_partials(output_dir)
    if set_aside:
        set_previous_run_aside(output_dir)


def clean_partials(output_dir) -> list[Path]:
    """Remove `.partial-step-*` directories left by a killed save of an earlier run in this
    output_dir. Rank 0 only, and only while it holds the output_dir's lock (train/run/run_lock.py):
    another live run's save in progress must never be touched."""
    r = root(output_dir)
    found = sorted(p for p in r.glob(f"{PARTIAL}step-*")
                   if p.is_dir() and NAME.match(p.name[len(PARTIAL):])) if r.is_dir() else []
    for p in found:
        durable.remove_tree(p)  # a link there goes, never what it points at
    return found


def set_previous_run_aside(output_dir) -> Path | None:
    """overwrite_output_dir with resume: never: move the previous run's checkpoints out of the
    way (into checkpoints/previous-run/), so that pruning never counts them with the new run's
    and a step number never collides. They are deleted only when the new run's first checkpoint
    is complete; until then they can be moved back by hand."""
    found = complete_checkpoints(output_dir)
    if not found:
        return None
    aside = root(output_dir) / SET_ASIDE
    aside.mkdir(exist_ok=True)
    for p in found:
        target = aside / p.name
        if target.exists():  # set aside by an earlier overwrite that never saved: keep the newer
            durable.remove_tree(target)
        os.rename(p, target)
    durable.fsync_path(aside)
    durable.fsync_path(root(output_dir))
    return aside


def drop_set_aside(output_dir) -> None:
    aside = root(output_dir) / SET_ASIDE
    if aside.exists():
        durable.remove_tree(aside)


def load_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def saved_world_size(path: Path) -> int:
    return int(load_state(path)["world_size"])


# ds_to_universal reads every ZeRO shard and writes one file per parameter and optimizer state,
# single-threaded (num_extract_workers=1). 20 MB/s is a deliberately low rate for that on a shared
# file system, and the factor 3 covers reading, merging and writing: a 7B model with fp32 Adam
# state (~112 GB) gets about 4.7 hours, a tiny one the floor.
CONVERSION_BYTES_PER_S = 20e6


def conversion_timeout_s(checkpoint_bytes: int, floor_s: float) -> float:
    """How long the other ranks wait for rank 0's conversion: the configured floor
    (checkpoint_conversion_timeout_s), raised for a checkpoint too big to convert within it."""
    return max(float(floor_s), 3.0 * checkpoint_bytes / CONVERSION_BYTES_PER_S)


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def convert_for_world_size(path: Path, rank: int, floor_s: float) -> Path:
    """Collective: rank 0 converts the checkpoint for another world size while the others wait.
    Not in the default process group's barrier, whose timeout (DeepSpeed's 10 minutes) a large
    model's conversion outlasts, but in a gloo group made for this wait alone, with a timeout
    from the checkpoint's size. Returns the directory to load the universal checkpoint from."""
    import datetime

    import torch.distributed as dist

    timeout = conversion_timeout_s(size_bytes(path), floor_s)
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    try:
        if rank == 0:
            to_universal(path)
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
    return path / "universal"


def to_universal(path: Path) -> Path:
    """Convert a checkpoint for loading under another world size (rank 0, once)."""
    out = path / "universal"
    if (out / "done").exists():
        return out
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = path / "universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp / path.name),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    ds_to_universal(args)
    (tmp / "done").write_text("")
    os.rename(tmp, out)
    return out
