"""A damaged latest checkpoint is never used, and never crashes resume: each file's size and
sha256 are recorded at commit (manifest.json) and verified on resume; resume falls back to the
previous checkpoint with one warning line naming the damaged file, or refuses (exit 2) when none
verifies. A missing RNG file resumes with a warning saying what changes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import TINY, run_cli

ENV = {"DS_ACCELERATOR": "cpu"}
SHORT = ["save_steps=2", "logging_steps=1", "eval_strategy=no", "per_device_train_batch_size=2",
         "save_total_limit=3"]


def train(data: Path, out: Path, *overrides: str):
    return run_cli("-m", "train", TINY, f"data.path={data}", f"output_dir={out}", *SHORT,
                   *overrides, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def saved(prepared, tmp_path_factory) -> Path:
    """One rank, 4 steps: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("saved") / "run"
    res = train(prepared, out, "max_steps=4")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def damaged_copy(saved: Path, tmp_path: Path, step: int, damage) -> tuple[Path, Path]:
    """A copy of the run whose step-N checkpoint is damaged by damage(dir) -> the file."""
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    return out, damage(out / "checkpoints" / f"step-{step:08d}")


def truncate_model(ckpt: Path) -> Path:
    f = next(ckpt.glob("*model_states.pt"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def flip_optimizer_byte(ckpt: Path) -> Path:
    f = next(ckpt.glob("*optim_states.pt"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return f


def delete_optimizer(ckpt: Path) -> Path:
    f = next(ckpt.glob("*optim_states.pt"))
    f.unlink()
    return f


def cut_trainer_state(ckpt: Path) -> Path:
    f = ckpt / "trainer_state.json"
    f.write_text(f.read_text()[:40])
    return f


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate_model, flip_optimizer_byte, delete_optimizer,
                                    cut_trainer_state])
def test_a_damaged_latest_checkpoint_falls_back_with_one_warning(prepared, saved, tmp_path,
                                                                 damage):
    out, bad = damaged_copy(saved, tmp_path, 4, damage)
    res = train(prepared, out, "max_steps=5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    warnings = [l for l in res.stderr.splitlines() if "is damaged" in l]
    assert len(warnings) == 1 and str(bad) in warnings[0], res.stderr[-3000:]
    assert "resuming from step-00000002" in warnings[0]
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in res.stderr
    # the damaged one is kept aside, out of the names resume and pruning count
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "damaged-step-00000004" in names and "step-00000005" in names, names


@pytest.mark.slow
def test_a_missing_rng_file_resumes_with_a_warning(prepared, saved, tmp_path):
    out, _ = damaged_copy(saved, tmp_path, 4,
                          lambda ckpt: (ckpt / "rng-rank0.safetensors").unlink())
    res = train(prepared, out, "max_steps=5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rng-rank0.safetensors is missing: rank 0's random streams restart from the seed" \
        in res.stderr
    assert "resumed from" in res.stderr and "step-00000004 at step 4" in res.stderr


def refused(res, *fragments):
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.slow
def test_no_good_checkpoint_left_or_a_damaged_one_named_is_refused(prepared, saved, tmp_path):
    out, bad = damaged_copy(saved, tmp_path, 4, truncate_model)
    cut_trainer_state(out / "checkpoints" / "step-00000002")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    refused(train(prepared, out, "max_steps=5"), "no undamaged checkpoint remains", str(bad))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing deleted
    named = out / "checkpoints" / "step-00000004"
    refused(train(prepared, out, "max_steps=5", f"resume={named}"),
            f"resume: {named} is damaged", str(bad))


def test_damage_names_the_file_and_accepts_an_intact_checkpoint(tmp_path):
    """The verification alone, on a hand-made checkpoint (fast)."""
    from train.run import checkpoint

    ckpt = tmp_path / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (ckpt / "model_states.pt").write_bytes(b"weights" * 100)
    (ckpt / "rng-rank0.safetensors").write_bytes(b"rng")
    assert checkpoint.damage(ckpt) is None  # no manifest: a checkpoint of an older version
    checkpoint.write_manifest(ckpt)
    assert checkpoint.damage(ckpt) is None
    assert checkpoint.latest_good(tmp_path) == (ckpt, [])
    (ckpt / "rng-rank0.safetensors").unlink()
    assert checkpoint.damage(ckpt) is None  # a missing RNG file is warned about at load
    (ckpt / "model_states.pt").write_bytes(b"weights" * 99 + b"weighTs")
    assert checkpoint.damage(ckpt) == f"{ckpt / 'model_states.pt'} fails its sha256 checksum"
    (ckpt / "model_states.pt").write_bytes(b"w")
    assert checkpoint.damage(ckpt) == f"{ckpt / 'model_states.pt'} is 1 bytes, 700 when saved"
    (ckpt / "manifest.json").write_text("{")
    assert "manifest.json is not readable" in checkpoint.damage(ckpt)
    assert checkpoint.latest_good(tmp_path) == (None, [(ckpt, checkpoint.damage(ckpt))])
