"""A full or read-only file system under a checkpoint save or an export, through the real
command line on 2 CPU ranks: one `error:` line per rank naming the path, the bytes needed and
free; every rank exits 74 (none waits in a collective for the one that failed); the previous
checkpoint is intact and still the latest; nothing partial looks complete. Small tmpfs mounts
(root, as in CI; skipped with the reason elsewhere)."""
from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

import pytest

from helpers import TINY, fill, mount_tmpfs, remount_read_only, run_train

from train.run import checkpoint

ENV = {"DS_ACCELERATOR": "cpu"}
RUN = ("max_steps=4", "save_steps=2", "logging_steps=1", "eval_steps=100", "eval_max_batches=1")


def exit_statuses(stderr: str) -> list[int]:
    """The workers' exit codes in torchrun's failure summary."""
    return [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)]


def storage_refusal(res, *fragments: str) -> None:
    out = res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, out[-4000:]  # one per rank
    assert all(f in "\n".join(errors) for f in fragments), errors
    assert exit_statuses(out) and set(exit_statuses(out)) == {74}, out[-4000:]


def good_latest(out: Path) -> Path:
    latest = checkpoint.latest(out)
    assert latest is not None and checkpoint.damage(latest) is None
    assert not [p.name for p in checkpoint.root(out).iterdir() if p.name.startswith(".partial")]
    return latest


@pytest.mark.slow
def test_a_full_or_read_only_disk_under_a_checkpoint_save(prepared, tmp_path):
    out = tmp_path / "run"
    res = run_train(TINY, f"data.path={prepared}", f"output_dir={out}", *RUN, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    root = checkpoint.root(out)
    step2, step4 = root / checkpoint.name(2), root / checkpoint.name(4)
    size = checkpoint.size_bytes(step4)
    # the run as it stood after its first save, its checkpoints on a file system of their own
    shutil.rmtree(step4)
    shutil.rmtree(out / "final")
    kept = tmp_path / "kept"
    shutil.move(str(step2), kept)
    unmount = mount_tmpfs(root, f"{2 * size // 1024 + 1024}k")
    try:
        shutil.copytree(kept, step2)
        before = checkpoint.damage(step2), checkpoint.size_bytes(step2)

        filler = fill(root, 64 * 1024)  # the step-4 save needs about `size` bytes
        res = run_train(TINY, f"data.path={prepared}", f"output_dir={out}", *RUN, env=ENV)
        storage_refusal(res, f"checkpoint save at step 4: no space left on device writing",
                        "MB free", "needs about", f"{step2} is still the latest checkpoint")
        assert good_latest(out) == step2
        assert (checkpoint.damage(step2), checkpoint.size_bytes(step2)) == before
        assert not (out / "final").exists()

        filler.unlink()
        remount_read_only(root)
        res = run_train(TINY, f"data.path={prepared}", f"output_dir={out}", *RUN, env=ENV)
        storage_refusal(res, "checkpoint save at step 4: ", "read-only file system",
                        f"{step2} is still the latest checkpoint")
        assert good_latest(out) == step2
        assert not (out / "final").exists()
    finally:
        unmount()


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
