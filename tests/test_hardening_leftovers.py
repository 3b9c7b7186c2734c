"""A refused run or prepare leaves nothing behind: not a `.watchdog/` directory, a run marker, a
`.prepare-files.json` or a shard, whether the directory was made by the command or was there
(empty, or a run directory with its own files) before it. Through the real command lines."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import TINY, run_cli

from train.run import run_dir

ENV = {"DS_ACCELERATOR": "cpu"}


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with a file's bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def refused(res, fragment: str) -> None:
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], res.stderr[-3000:]


def corrupt_copy(prepared: Path, dst: Path) -> Path:
    """The data with one train shard's bytes changed: found when the run opens its shards, after
    output_dir is marked and the watchdog is up."""
    shutil.copytree(prepared, dst)
    shard = sorted(dst.glob("train-*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[10:14] = b"xxxx"
    shard.write_bytes(bytes(data))
    return dst


def test_a_run_refused_by_its_config_leaves_an_empty_output_dir_empty(prepared, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    res = run_cli("-m", "train", TINY, f"data.path={prepared}", f"output_dir={out}",
                  "learning_rate=nan", env=ENV, timeout=300)
    refused(res, "learning_rate")
    assert os.listdir(out) == []


def test_model_sizes_that_cannot_be_built_are_a_usage_error():
    """n_embd not divisible by n_head: one line naming model.config (preflight builds the model
    on the meta device, so the launcher refuses it too, before the queue)."""
    from transformers import GPT2Config

    from train.errors import UsageError
    from train.model import parameter_numels

    with pytest.raises(UsageError, match="model.config: transformers cannot build a gpt2 model "
                                         "with these sizes .*divisible"):
        parameter_numels(GPT2Config(n_embd=130, n_head=4, n_layer=1), "AutoModelForCausalLM")


@pytest.mark.slow
def test_a_run_refused_after_it_began_leaves_an_empty_output_dir_empty(prepared, tmp_path):
    """A corrupt shard is found when the run opens its shards: after the marker and the
    watchdog's directory were written. Neither stays."""
    out = tmp_path / "run"
    out.mkdir()
    res = run_cli("-m", "train", TINY, f"data.path={corrupt_copy(prepared, tmp_path / 'data')}",
                  f"output_dir={out}", "max_steps=2", env=ENV, timeout=300)
    refused(res, "fails its sampled checksum")
    assert os.listdir(out) == []


@pytest.mark.slow
def test_a_run_directory_is_left_as_it_was_by_a_refused_start(prepared, tmp_path):
    """A run directory of an earlier start (its marker, its metrics.jsonl and logs) is left
    byte for byte as it was."""
    out = tmp_path / "run"
    run_dir.mark(out)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    (out / "logs").mkdir()
    (out / "logs" / "1_0_log.err").write_text("an earlier attempt\n")
    before = tree(out)
    res = run_cli("-m", "train", TINY, f"data.path={corrupt_copy(prepared, tmp_path / 'data')}",
                  f"output_dir={out}", "max_steps=2", env=ENV, timeout=300)
    refused(res, "fails its sampled checksum")
    assert tree(out) == before


@pytest.mark.parametrize("content, fragment", [
    (b"\x00\x01binary" * 100, "a binary file"),
    (b'{"text": "fine"}\n{not json\n', "line 2: not valid JSON"),
], ids=["binary", "bad-json-line"])
@pytest.mark.parametrize("where", ["empty", "partial"])
def test_a_refused_prepare_leaves_nothing(tmp_path, content, fragment, where):
    """A bad input found while reading (after the output's state file is written): nothing the
    prepare added stays; the files of an earlier, killed prepare are not its to remove. (A
    directory prepare makes goes whole: tests/test_hardening.py.)"""
    bad = tmp_path / "in.jsonl"
    bad.write_bytes(content)
    out = tmp_path / "data"
    out.mkdir()
    if where == "partial":
        (out / "train-00000.bin.tmp").write_bytes(b"\0" * 8)  # a killed prepare's
    before = tree(out)
    res = run_cli("-m", "train.prepare", "--input", str(bad), "--output", str(out),
                  "--train-tokenizer", "300", "--no-progress")
    refused(res, fragment)
    assert tree(out) == before
