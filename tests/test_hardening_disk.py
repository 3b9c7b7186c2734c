"""A full or read-only file system under a checkpoint save or an export, through the real
command line on 2 CPU ranks: one `error:` line per rank naming the path, the bytes needed and
free; every rank exits 74 (none waits in a collective for the one that failed); the previous
checkpoint is intact and still the latest; nothing partial looks complete. Small tmpfs mounts
(root, as in CI; skipped with the reason elsewhere)."""
from __future__ import annotations

import contextlib
import gc
import re
import shutil
from pathlib import Path

import pytest

from helpers import TINY, fill, mount_tmpfs, remount_read_only, run_train

from train.run import checkpoint, run_dir

ENV = {"DS_ACCELERATOR": "cpu"}
RUN = ("max_steps=4", "save_steps=2", "logging_steps=1", "eval_steps=100", "eval_max_batches=1")


def exit_statuses(stderr: str) -> list[int]:
    """The workers' exit codes in torchrun's failure summary, the first failure's first."""
    summary = stderr[stderr.rindex("Root Cause"):]
    return [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", summary)]


def storage_refusal(res, *fragments: str) -> list[str]:
    """Exit status 74, no traceback from a rank, every rank's error line says what happened."""
    log = res.stderr
    ranks_log = log[:log.find("Traceback")] if "ChildFailedError" in log else log
    assert res.returncode != 0 and "Traceback" not in ranks_log, log[-4000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors and all(f in errors[0] for f in fragments), log[-4000:]
    return errors


def checkpoints_on_a_tmpfs(out: Path, size: str):
    """output_dir, marked as a run directory (as the launcher does before it submits), with its
    checkpoints/ on a tmpfs of its own: the rest of the run writes as usual."""
    run_dir.mark(out)
    return mount_tmpfs(checkpoint.root(out), size)


def only(out: Path, *steps: int) -> None:
    """The complete checkpoints are these steps, each verifies, and no partial save remains."""
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == \
        [checkpoint.name(s) for s in steps]
    assert all(checkpoint.damage(p) is None for p in checkpoint.complete_checkpoints(out))
    assert not [p.name for p in checkpoint.root(out).iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_full_disk_under_a_checkpoint_save_of_two_ranks(prepared, tmp_path):
    """The checkpoints' file system holds one checkpoint (about 7.7 MB: 0.48 M parameters x 16
    bytes, fp32 ZeRO-2) but not two: step 2 commits, step 4 finds the disk full on a rank. Both
    ranks agree and exit 74 (torchrun's first failure; it ends the other at once, so a rank that
    hangs would show as a timeout here), and step 2 is intact and still the latest."""
    out = tmp_path / "run"
    unmount = checkpoints_on_a_tmpfs(out, "12m")
    try:
        res = run_train(TINY, f"data.path={prepared}", f"output_dir={out}", *RUN, env=ENV,
                        timeout=240)
        errors = storage_refusal(res, "checkpoint save at step 4: no space left on device "
                                 f"writing {checkpoint.root(out)}", "MB free", "needs about",
                                 f"{checkpoint.root(out) / checkpoint.name(2)} is still the "
                                 f"latest checkpoint")
        assert exit_statuses(res.stderr)[0] == 74, res.stderr[-3000:]
        assert set(exit_statuses(res.stderr)) <= {74, -15}, res.stderr[-3000:]
        assert len(errors) <= 2, errors  # one per rank at most
        only(out, 2)
        assert not (out / "final").exists() and not (out / ".final.tmp").exists()
    finally:
        unmount()


class Engine:
    """Writes what DeepSpeed's save_checkpoint would, with torch's zip writer (whose error on a
    full disk is a RuntimeError that names no errno): `megabytes` of weights."""

    def __init__(self, megabytes: float = 0.01):
        self.numel = int(megabytes * 1e6 / 4)

    def save_checkpoint(self, root, tag, save_latest):
        import torch

        (Path(root) / tag).mkdir(exist_ok=True)
        torch.save({"w": torch.ones(self.numel)}, Path(root) / tag / "mp_rank_00_model_states.pt")

    def zero_optimization_stage(self):
        return 2


def save(out, step, engine=None, **kw):
    return checkpoint.save(engine or Engine(), out, step, {"step": step}, 0, lambda: None, **kw)


def test_a_full_or_read_only_disk_under_a_save_keeps_the_previous_checkpoint(tmp_path):
    from train.errors import StorageError

    out = tmp_path / "fs"
    unmount = mount_tmpfs(out, "4m")
    try:
        save(out, 1)
        filler = fill(out, 256 * 1024)
        with pytest.raises(StorageError) as err:
            save(out, 2, Engine(1.0), needed=1_000_000)
        line = str(err.value)
        assert line.startswith(f"checkpoint save at step 2: no space left on device writing "
                               f"{checkpoint.root(out)}"), line
        assert "needs about 1.0 MB, 0." in line and "MB free" in line, line
        assert line.endswith(f"{checkpoint.root(out) / checkpoint.name(1)} is still the latest "
                             f"checkpoint"), line
        only(out, 1)
        del err
        gc.collect()  # the failed write's file, closed: a busy file system cannot be remounted
        filler.unlink()
        remount_read_only(out)
        with pytest.raises(StorageError) as err:
            save(out, 2, needed=1_000_000)
        assert "read-only file system" in str(err.value), err.value
        only(out, 1)
    finally:
        unmount()


@pytest.mark.parametrize("elsewhere, raised", [(2, "StorageError"), (1, "RuntimeError")])
def test_a_save_that_failed_on_another_rank_fails_here_too(tmp_path, elsewhere, raised):
    """The other rank's failure comes in agree's reduction after this rank wrote its part: this
    rank raises too (a storage failure as StorageError, exit 74), and the partial save goes."""
    out = tmp_path / "run"
    save(out, 1)
    calls = []

    def agree(code):
        calls.append(code)
        return max(code, elsewhere if len(calls) == 2 else 0)

    with pytest.raises(Exception) as err:
        save(out, 2, agree=agree)
    assert type(err.value).__name__ == raised and "failed on another rank" in str(err.value)
    assert calls == [0, 0]  # this rank's own writes went well
    only(out, 1)


def test_a_full_or_read_only_disk_under_the_export(prepared, tmp_path):
    """export_final on one rank, with a real (tiny) Hugging Face model: the line names the
    path, the bytes the weights need and the bytes free; no temporary directory stays, and an
    earlier export is left as it was."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from train.errors import StorageError
    from train.run.export import export_final

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=2,
                                    n_positions=64))  # about 0.6 MB of fp32 weights

    class Model:
        @contextlib.contextmanager
        def unwrapped_for_export(self):
            yield hf

    class Engine:
        def zero_optimization_stage(self):
            return 2

    fs = tmp_path / "fs"
    unmount = mount_tmpfs(fs, "4m")
    try:
        export_final(Engine(), Model(), fs / "final", prepared, 0, lambda: None, config={})
        earlier = {p.name: p.read_bytes() for p in (fs / "final").iterdir()}
        filler = fill(fs, 128 * 1024)
        with pytest.raises(StorageError) as err:
            export_final(Engine(), Model(), fs / "final", prepared, 0, lambda: None, config={},
                         agree=lambda code: code)
        line = str(err.value)
        assert line.startswith("export: no space left on device writing "), line
        assert "needs about 0." in line and "MB free" in line and "\n" not in line, line
        assert f"{fs / 'final'} is the earlier export, as it was" in line, line
        assert sorted(p.name for p in fs.iterdir()) == ["filler", "final"]
        assert {p.name: p.read_bytes() for p in (fs / "final").iterdir()} == earlier

        filler.unlink()
        shutil.rmtree(fs / "final")
        remount_read_only(fs)
        with pytest.raises(StorageError) as err:
            export_final(Engine(), Model(), fs / "final", prepared, 0, lambda: None, config={})
        assert "read-only file system" in str(err.value) and "no " in str(err.value)
        assert list(fs.iterdir()) == []
    finally:
        unmount()
