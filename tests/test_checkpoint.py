"""Checkpoint logic without a training run: durability (fsync order), RNG state without pickle,
overwrite_output_dir's set-aside, the output_dir lock's rules, the conversion timeout, and the
config-drift table's coverage. The real runs are in tests/test_train.py."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.run import checkpoint, config_drift, run_lock
from train import durable
from train.errors import UsageError


class FakeEngine:
    """Writes one file per rank where DeepSpeed's save_checkpoint writes its shards."""

    def save_checkpoint(self, root, tag, save_latest):
        (Path(root) / tag).mkdir(exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")

    def zero_optimization_stage(self):
        return 2


@pytest.fixture
def fsynced(monkeypatch):
    """The paths os.fsync was called on, in order (read from the descriptor itself)."""
    calls = []
    real = os.fsync

    def record(fd):
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def test_a_checkpoint_commit_fsyncs_its_files_its_directory_then_the_rename(tmp_path, fsynced):
    out = tmp_path / "run"
    final = checkpoint.save(FakeEngine(), out, 5, {"step": 5}, rank=0, barrier=lambda: None)
    partial = final.with_name(".partial-" + final.name)
    files = {partial / p.name for p in final.iterdir()}
    assert files == {partial / "mp_rank_00_model_states.pt", partial / "trainer_state.json",
                     partial / "rng-rank0.safetensors", partial / "manifest.json"}
    assert files <= set(fsynced)  # every file, under the name it had before the rename
    # the directory after its files, and the parent (the rename) after everything
    assert fsynced.index(partial) > max(fsynced.index(f) for f in files)
    assert fsynced[-1] == checkpoint.root(out)


def test_the_export_is_fsynced_before_and_after_its_rename(tmp_path, fsynced):
    from train.run.export import export_final

    class Model:
        @contextlib.contextmanager
        def unwrapped_for_export(self):
            class HF:
                def save_pretrained(self, path, state_dict, safe_serialization):
                    Path(path).mkdir(exist_ok=True)  # as transformers' own does
                    (Path(path) / "model.safetensors").write_bytes(b"w")
            yield HF()

    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.json").write_text("{}")
    export_final(FakeEngine(), Model(), tmp_path / "final", data, 0, lambda: None, config={})
    tmp = tmp_path / ".final.tmp"
    for name in ("model.safetensors", "tokenizer.json", "train_config.json"):
        assert tmp / name in fsynced
    assert fsynced[-2:] == [tmp, tmp_path]


def test_rng_state_round_trips_without_pickle(tmp_path, monkeypatch, capsys):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    checkpoint.save_rng(tmp_path, 0)
    want = (random.random(), np.random.randn(), np.random.randint(1 << 30), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)

    def no_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint of ours was unpickled")
    monkeypatch.setattr(torch, "load", no_pickle)
    assert checkpoint.load_rng(tmp_path, 0)
    got = (random.random(), np.random.randn(), np.random.randint(1 << 30), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])

    # the older pickled format is never opened: the streams restart, and a note says so
    old = tmp_path / "old"
    old.mkdir()
    (old / "rng-rank0.pt").write_bytes(b"\x80\x04 not to be unpickled")
    assert not checkpoint.load_rng(old, 0)
    assert "old pickled format, which is not loaded" in capsys.readouterr().err


def test_overwrite_sets_the_previous_run_aside_until_the_first_new_checkpoint(tmp_path):
    out = tmp_path / "run"
    for step in (5, 10):
        checkpoint.save(FakeEngine(), out, step, {"step": step, "run": "old"}, 0, lambda: None)
    stale = checkpoint.root(out) / ".partial-step-00000015"
    stale.mkdir()
    unrelated = checkpoint.root(out) / ".partial-notes"  # not our naming pattern: kept
    unrelated.mkdir()

    checkpoint.take_over(out, set_aside=True)
    assert not stale.exists() and unrelated.exists()
    assert checkpoint.complete_checkpoints(out) == []  # a new run counts only its own
    aside = checkpoint.root(out) / "previous-run"
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000005", "step-00000010"]

    checkpoint.save(FakeEngine(), out, 5, {"step": 5, "run": "new"}, 0, lambda: None, keep=1)
    assert not aside.exists()  # dropped once the new run has a checkpoint of its own
    [only] = checkpoint.complete_checkpoints(out)
    assert checkpoint.load_state(only) == {"step": 5, "run": "new"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _holder(job=None, host=None, pid=None):
    return run_lock.Holder(job, host or socket.gethostname(), pid or os.getpid(), "2026-01-01")


def _write_lock(out: Path, holder):
    out.mkdir(parents=True, exist_ok=True)
    run_lock.lock_path(out).write_text(json.dumps(dataclasses.asdict(holder)))


@pytest.mark.parametrize("case,holder,me,squeue,taken", [
    ("live pid on this host", _holder(), _holder(pid=1), None, False),
    ("dead pid on this host", _holder(pid=_dead_pid()), _holder(pid=1), None, True),
    ("another host, no Slurm", _holder(host="elsewhere", pid=_dead_pid()), _holder(), None, False),
    ("a job squeue still runs", _holder(job="77", pid=_dead_pid()), _holder(), True, False),
    ("a job squeue no longer lists", _holder(job="77", host="elsewhere"), _holder(), False, True),
    ("requeued: same job, new pid", _holder(job="77"), _holder(job="77", pid=1), True, True),
    ("another job on a live pid", _holder(job="77"), _holder(job="78", pid=1), None, False),
])
def test_lock_rules(tmp_path, monkeypatch, case, holder, me, squeue, taken):
    """Who may take output_dir's lock over (train/run/run_lock.py's rule); squeue's answer is
    given (None: no Slurm here)."""
    monkeypatch.setattr(run_lock, "slurm_job_running", lambda job: squeue)
    _write_lock(tmp_path, holder)
    if taken:
        run_lock.refuse_if_held(tmp_path, me)
        assert run_lock.acquire(tmp_path, me) == me == run_lock.read_holder(tmp_path)
        run_lock.release(tmp_path, me)
        assert not run_lock.lock_path(tmp_path).exists()
    else:
        for attempt in (run_lock.refuse_if_held, run_lock.acquire):
            with pytest.raises(UsageError, match=f"in use by another run .*pid {holder.pid}"):
                attempt(tmp_path, me)
        assert run_lock.read_holder(tmp_path) == holder  # a refused run leaves it alone


def test_conversion_timeout_grows_past_the_default_barrier_for_a_big_checkpoint():
    assert checkpoint.conversion_timeout_s(50_000_000, floor_s=1800) == 1800  # tiny: the floor
    # a 7B model with fp32 Adam state (16 bytes a parameter): hours, not DeepSpeed's 10 minutes
    seconds = checkpoint.conversion_timeout_s(7e9 * 16, floor_s=1800)
    assert seconds == pytest.approx(3 * 7e9 * 16 / 20e6) and seconds > 4 * 3600


def test_conversion_waits_in_its_own_group_with_that_timeout(tmp_path, monkeypatch):
    import torch.distributed as dist

    (tmp_path / "big").write_bytes(b"\0" * 1000)
    seen = {}
    monkeypatch.setattr(checkpoint, "CONVERSION_BYTES_PER_S", 1.0)  # 1000 bytes: 3000 s
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: seen.update(
        backend=backend, timeout=timeout.total_seconds()) or "group")
    monkeypatch.setattr(dist, "barrier", lambda group: seen.update(barrier=group))
    monkeypatch.setattr(dist, "destroy_process_group", lambda group: seen.update(destroyed=group))
    assert checkpoint.convert_for_world_size(tmp_path, rank=1, floor_s=60) == tmp_path / "universal"
    assert seen == {"backend": "gloo", "timeout": 3000.0, "barrier": "group", "destroyed": "group"}


def _keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            yield from _keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_config_key_has_a_drift_rule():
    """A new config key must be classified (harmless or not) in config_drift.RULES."""
    from train.config import Config

    def classified(key):
        parts = key.split(".")
        return any(".".join(parts[:n]) in config_drift.RULES for n in range(1, len(parts) + 1))
    assert [k for k in _keys(Config) if not classified(k)] == []


def test_durable_fsync_tree_covers_nested_directories(tmp_path, fsynced):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    durable.fsync_tree(tmp_path)
    assert fsynced == [tmp_path / "a" / "b" / "f", tmp_path / "a" / "b", tmp_path / "a", tmp_path]


def test_drift_rules_for_the_run_length_older_checkpoints_and_a_moved_data_path():
    base = {"max_steps": -1, "num_train_epochs": 3.0, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1, "data": {"path": "a"}}
    changes = config_drift.changes
    assert changes(base, {**base, "num_train_epochs": 4.0}, 1, 1) == []  # longer
    assert changes(base, {**base, "num_train_epochs": 2.0}, 1, 1) == [("num_train_epochs", 3.0, 2.0)]
    # switching from epochs to max_steps changes the schedule's length
    assert changes(base, {**base, "max_steps": 100}, 1, 1) == [("max_steps", -1, 100)]
    by_steps = {**base, "max_steps": 100}
    assert changes(by_steps, {**by_steps, "num_train_epochs": 1.0}, 1, 1) == []  # max_steps decides
    # a key the saving version did not have is not compared
    assert changes(base, {**base, "a_new_key": 1}, 1, 1) == []
    # data.path may move when the data's identity is known to be the same; not otherwise
    moved = {**base, "data": {"path": "b"}}
    assert changes(base, moved, 1, 1, {"tokenizer_sha256": "x"}, {"tokenizer_sha256": "x"}) == []
    assert changes(base, moved, 1, 1) == [("data.path", "a", "b")]
