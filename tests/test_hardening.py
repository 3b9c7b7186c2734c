"""Hardening, second round, through the real command lines: a user's files, a stray symbolic
link, a hostile string, a tokenizer that does not match, the umask, and bad input that used to
reach a traceback. Each class tries several members; a refusal is one `error:` line naming the
file, key or flag, exit status 2, and nothing of the user's is touched."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from helpers import REPO, TINY, free_port, run_cli

ENV = {"DS_ACCELERATOR": "cpu"}


def refused(res, *fragments: str) -> str:
    """The process exited 2 with exactly one error line, holding every fragment."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def train_cli(data, out, *overrides, cwd=REPO, env=None):
    return run_cli("-m", "train", TINY, f"data.path={data}", f"output_dir={out}", *overrides,
                   env={**ENV, **(env or {})}, cwd=cwd, timeout=300)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# output_dir: only ever a directory the run made
# ---------------------------------------------------------------------------------------------

def users_directory(root: Path) -> Path:
    """A directory of a user's work, with names a run also writes."""
    (root / "final").mkdir(parents=True)
    (root / "final" / "notes.tex").write_text("\\section{results}\n")
    (root / "metrics.jsonl").write_text('{"step": 1, "from": "another tool"}\n')
    return root


@pytest.mark.parametrize("overrides", [
    [], ["resume=never", "overwrite_output_dir=true"], ["resume=never"]])
@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_a_users_directory_is_refused_whatever_resume_says(prepared, tmp_path, overrides):
    out = users_directory(tmp_path / "thesis")
    before = snapshot(out)
    res = train_cli(prepared, out, "max_steps=2", *overrides)
    refused(res, f"output_dir {out}", "not a run directory", str(out / "final"))
    assert snapshot(out) == before
    assert sorted(os.listdir(out)) == ["final", "metrics.jsonl"]  # nothing added either


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_the_launcher_refuses_a_users_directory_before_submitting(prepared, tmp_path):
    out = users_directory(tmp_path / "thesis")
    before = snapshot(out)
    res = run_cli("-m", "launcher", "--dry-run", TINY, f"data.path={prepared}",
                  f"output_dir={out}")
    refused(res, "not a run directory")
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["root", "home", "data", "cwd"])
@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_places_that_are_never_an_output_dir(prepared, tmp_path, where):
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "project"
    cwd.mkdir()
    (cwd / "paper.md").write_text("draft\n")
    out, fragment = {"root": ("/", "is the root directory"),
                     "home": (str(home), "is your home directory"),
                     "data": (str(prepared), "is the data directory"),
                     "cwd": (".", "is the current directory, which holds other files")}[where]
    before = snapshot(prepared)
    res = run_cli("-m", "train", TINY, f"data.path={prepared}", f"output_dir={out}",
                  env={**ENV, "HOME": str(home), "PYTHONPATH": str(REPO)}, cwd=cwd)
    refused(res, fragment)
    assert snapshot(prepared) == before
    assert sorted(os.listdir(cwd)) == ["paper.md"]


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_the_default_output_dir_is_named_not_silent(prepared, tmp_path):
    config = tmp_path / "no-output-dir.yaml"
    config.write_text("\n".join(line for line in Path(TINY).read_text().splitlines()
                                if not line.startswith("output_dir")))
    res = run_cli("-m", "launcher", "--dry-run", str(config), f"data.path={prepared}",
                  cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"note: output_dir is not set: the run writes to {tmp_path / 'runs' / 'default'}" \
        in res.stderr
    assert not (tmp_path / "runs").exists()


def test_what_counts_as_a_run_directory(tmp_path):
    """run_dir.check alone (fast): new, empty, marked, a starting run's own files, and a run
    directory of a version before the marker are accepted; anything else is refused."""
    from train.errors import UsageError
    from train.run import run_dir

    accepted = {"absent": [], "empty": ["."], "marked": [".slurm-lm-run.json", "notes.tex"],
                "starting": [".lock", ".watchdog/rank-1.json", ".rendezvous-0.json"],
                "before the marker": ["metrics.jsonl", "checkpoints/step-00000002/"
                                      "trainer_state.json", "final/config.json"]}
    refused_ = {"a user's": ["notes.tex"], "only run names, no checkpoint": ["metrics.jsonl"],
                "a half checkpoint": ["checkpoints/step-00000002/model.pt"]}
    for cases, ok in ((accepted, True), (refused_, False)):
        for case, files in cases.items():
            out = tmp_path / case
            for name in files:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                if name != ".":
                    (out / name).write_text("{}")
            if ok:
                run_dir.check(out)
            else:
                with pytest.raises(UsageError, match="not a run directory"):
                    run_dir.check(out)
    run_dir.mark(tmp_path / "fresh")
    run_dir.check(tmp_path / "fresh")
    assert run_dir.is_marked(tmp_path / "fresh")


# ---------------------------------------------------------------------------------------------
# No write through a symbolic link
# ---------------------------------------------------------------------------------------------

def test_prepare_never_writes_through_a_link_in_its_output(corpus_dir, tmp_path):
    """Links planted where prepare writes its temporary files: each is replaced by a file of
    prepare's own, and the files they pointed at are untouched."""
    out = tmp_path / "data"
    out.mkdir()
    victims = {}
    for name in ("train-00000.bin.tmp", "index.json.tmp", ".prepare-files.json.tmp",
                 "train-00000.json.tmp"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious\n")
        victims[victim] = victim.read_bytes()
        os.symlink(victim, out / name)
    res = run_cli("-m", "train.prepare", "--input", str(corpus_dir / "a.jsonl"), "--output",
                  str(out), "--train-tokenizer", "300", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    for victim, content in victims.items():
        assert victim.read_bytes() == content, victim
    assert not any(p.is_symlink() for p in out.iterdir())
    assert (out / "index.json").is_file()


@pytest.mark.parametrize("name", ["train-00000.bin", "tokenizer.json"])
def test_a_data_file_linked_from_outside_is_refused(prepared, tmp_path, name):
    data = copy_data(prepared, tmp_path / "data")
    outside = tmp_path / f"elsewhere-{name}"
    shutil.move(data / name, outside)
    os.symlink(outside, data / name)
    res = train_cli(data, tmp_path / "o")
    refused(res, f"{data / name} is a symbolic link to {outside}", "outside the data directory")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoints", "final"])
@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_a_link_among_a_run_directorys_own_files_is_refused(prepared, tmp_path, name):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".slurm-lm-run.json").write_text('{"format": 1}\n')
    target = tmp_path / "target"
    target.write_text("not the run's\n")
    os.symlink(target, out / name)
    res = train_cli(prepared, out, "max_steps=2")
    refused(res, f"{out / name} is a symbolic link")
    assert target.read_text() == "not the run's\n"


def test_durable_writes_replace_a_link_and_appends_refuse_one(tmp_path):
    from train import durable
    from train.errors import UsageError

    target = tmp_path / "target"
    target.write_text("keep\n")
    for i, write in enumerate([lambda p: durable.write_json(p, {"a": 1}),
                               lambda p: durable.write_text(p, "new\n"),
                               lambda p: durable.create_fresh(p).close()]):
        link = tmp_path / f"link{i}"
        os.symlink(target, link)
        write(link)
        assert not link.is_symlink() and target.read_text() == "keep\n"
    os.symlink(target, tmp_path / "log")
    with pytest.raises(UsageError, match="is a symbolic link"):
        durable.open_append(tmp_path / "log")
    assert target.read_text() == "keep\n"


# ---------------------------------------------------------------------------------------------
# Nothing typed reaches the sbatch script unchecked
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [
    ("--partition", "gpu\n#SBATCH --uid=0"),
    ("--account", "proj\r#SBATCH --qos=high"),
    ("--qos", "normal high"),
    ("--constraint", "a100\x1b[2J"),
    ("--exclude", "node1\tnode2"),
    ("--time", "1:00:00\n#SBATCH --uid=0"),
])
@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_a_hostile_sbatch_option_is_refused(prepared, tmp_path, flag, value):
    res = run_cli("-m", "launcher", "--dry-run", flag, value, TINY, f"data.path={prepared}",
                  f"output_dir={tmp_path / 'o'}")
    refused(res, flag, "would break the sbatch script")
    assert "#SBATCH" not in res.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where,flags,words", [
    ("override 2", [], ["max_steps=2\n#SBATCH --uid=0"]),
    ("--prepare", ["--prepare", "--input x\n--output d --train-tokenizer 300"], []),
    ("output_dir", [], []),        # from the config file: the log folder's #SBATCH line
    ("the config path", [], []),
])
@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_a_control_character_in_a_command_word_is_refused(prepared, tmp_path, where, flags,
                                                          words):
    config = tmp_path / ("tiny\n.yaml" if where == "the config path" else "tiny.yaml")
    text = Path(TINY).read_text()
    if where == "output_dir":
        text = text.replace("output_dir: runs/tiny-clm", f'output_dir: "{tmp_path}/run\\nx"')
    config.write_text(text)
    res = run_cli("-m", "launcher", "--dry-run", *flags, str(config), f"data.path={prepared}",
                  *words)
    refused(res, where, "would break the sbatch script")
    assert "#SBATCH" not in res.stdout


# ---------------------------------------------------------------------------------------------
# The tokenizer beside the shards is the one they were made with
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["edited", "swapped", "missing"])
def test_a_tokenizer_that_does_not_match_the_shards_is_refused(prepared, stdlib_data, tmp_path,
                                                               case):
    data = copy_data(prepared, tmp_path / "data")
    tokenizer = data / "tokenizer.json"
    if case == "edited":
        tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=2))
    elif case == "swapped":
        shutil.copyfile(stdlib_data / "tokenizer.json", tokenizer)
    else:
        tokenizer.unlink()
    res = train_cli(data, tmp_path / "o")
    refused(res, str(tokenizer), "prepare the data again" if case == "missing"
            else "is not the tokenizer the shards were made with")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# A real run: the marker, the umask, a resume on a marked directory (slow)
# ---------------------------------------------------------------------------------------------

def modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode))
            for p in [root, *root.rglob("*")]}


@pytest.mark.slow
def test_a_run_marks_its_directory_honours_the_umask_and_resumes(prepared, tmp_path):
    out = tmp_path / "o"
    short = ["max_steps=2", "save_steps=2", "logging_steps=1", "eval_steps=2",
             "eval_max_batches=1", "per_device_train_batch_size=2"]
    args = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "train", TINY, f"data.path={prepared}", f"output_dir={out}"]
    # umask 002 (a team's shared directory): group-writable files, never 0600
    res = run_cli("-c", "import os, runpy, sys; os.umask(0o002); sys.argv = ['torchrun'] + "
                  "sys.argv[1:]; runpy.run_module('torch.distributed.run', run_name='__main__')",
                  *args[2:], *short, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / ".slurm-lm-run.json").read_text())["format"] == 1
    # (checkpoints/ itself also holds DeepSpeed's own zero_to_fp32.py, with its exec bit)
    for tree in (out / "final", *(out / "checkpoints").glob("step-*")):
        assert modes(tree) <= {("dir", 0o775), ("file", 0o664)}, (tree, modes(tree))
    # the marked directory, with its checkpoint, resumes (and is no foreign directory)
    res = run_cli(*args, *short[1:], "max_steps=3", env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resum" in res.stderr.lower()


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the key, file or flag, never a traceback
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    ("learning_rate=.nan", "learning_rate"),
    ("adam_epsilon=.inf", "adam_epsilon"),
    ("weight_decay=-.inf", "weight_decay"),
    ("max_grad_norm=nan", "max_grad_norm"),
    ("warmup_steps=.inf", "warmup_steps"),
    ("adam_beta1=.nan", "adam_beta1"),
    ("model.config.initializer_range=.nan", "model.config.initializer_range"),
])
def test_nan_and_infinity_are_refused_naming_the_key(prepared, tmp_path, override, key):
    res = train_cli(prepared, tmp_path / "o", override)
    refused(res, f"config key {key} is", "must be a finite number")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,fragments", [
    ("learning_rate: 3e-4\ndata: {path: x\nmax_steps: 2\n", ["bad.yaml:3:", "not valid YAML"]),
    ("- learning_rate\n- max_steps\n", ["bad.yaml holds a list, not a mapping"]),
    ("data: [1, 2]\n", ["config section data must be a mapping, got list"]),
    ("model:\n  config: [gpt2]\n", ["config key model.config is ['gpt2']"]),
    ("learning_rat: 3e-4\n", ["unknown config key learning_rat; did you mean learning_rate?"]),
    ("data:\n  seq_lne: 64\n", ["unknown config key data.seq_lne; did you mean data.seq_len?"]),
])
def test_a_bad_yaml_file_is_one_line_naming_where(tmp_path, text, fragments):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    res = run_cli("-m", "train", str(config), env=ENV)
    line = refused(res, *fragments)
    assert "^" not in line


def test_a_binary_config_file_is_refused(tmp_path):
    config = tmp_path / "model.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    refused(run_cli("-m", "train", str(config), env=ENV), str(config))


def prepare_cli(tmp_path, *inputs: str, output=None):
    return run_cli("-m", "train.prepare", *[w for i in inputs for w in ("--input", i)],
                   "--output", str(output or tmp_path / "data"), "--train-tokenizer", "300",
                   "--no-progress")


@pytest.mark.parametrize("name,content,fragments", [
    ("corpus.parquet", b"PAR1 this is not parquet at all", ["corpus.parquet: not a readable "
                                                             "Parquet file"]),
    ("photo.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" * 50, ["photo.txt: holds NUL bytes"]),
    ("corpus.jsonl", b'{"text": "one"}\n{"text": "two"\n{"text": "three"}\n',
     ["corpus.jsonl line 2: not valid JSON"]),
    ("corpus.json", b'[{"text": "one"}, {"text": ]', ["corpus.json: not valid JSON"]),
])
def test_a_bad_input_file_is_refused_and_leaves_nothing(tmp_path, name, content, fragments):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n"
                            for i in range(50)))
    bad = tmp_path / name
    bad.write_bytes(content)
    res = prepare_cli(tmp_path, str(good), str(bad))
    refused(res, *fragments)
    assert not (tmp_path / "data").exists()  # no .prepare-files.json, no partial shards


def test_prepare_output_that_is_a_file_is_refused(corpus_dir, tmp_path):
    out = tmp_path / "data"
    out.write_text("a user's file\n")
    refused(prepare_cli(tmp_path, str(corpus_dir / "a.jsonl"), output=out),
            f"--output {out} is an existing file")
    assert out.read_text() == "a user's file\n"


@pytest.fixture(scope="module")
def model_dir(prepared, tmp_path_factory) -> Path:
    """A tiny exported model (random weights) with the prepared data's tokenizer."""
    import transformers

    out = tmp_path_factory.mktemp("model")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64,
                                     vocab_size=512)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (prepared / name).exists():
            shutil.copyfile(prepared / name, out / name)
    return out


@pytest.mark.parametrize("args,fragments", [
    (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1"]),
    (["--strategy", "top_k", "--temperature", "0"], ["--temperature must be a positive"]),
    (["--strategy", "top_p", "--temperature", "nan"], ["--temperature must be a positive"]),
    (["--strategy", "top_p", "--top-p", "0"], ["--top-p must be in (0, 1]"]),
    (["--prompt", ""], ["--prompt is empty"]),
])
def test_generate_refuses_values_it_would_crash_on(model_dir, args, fragments):
    prompt = [] if "--prompt" in args else ["--prompt", "def f("]
    res = run_cli("-m", "train.generate", "--model", str(model_dir), *prompt, *args)
    refused(res, *fragments)


@pytest.mark.parametrize("remove,fragment", [
    ("model.safetensors", "has no weights"),
    ("tokenizer.json", "has no tokenizer.json"),
    ("config.json", "is not a Hugging Face model directory"),
])
@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_generate_refuses_an_incomplete_model_directory(model_dir, tmp_path, remove, fragment):
    broken = copy_data(model_dir, tmp_path / "model")
    (broken / remove).unlink()
    res = run_cli("-m", "train.generate", "--model", str(broken), "--prompt", "x")
    refused(res, f"--model {broken}", fragment)


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_evaluate_refuses_a_non_export_and_no_eval_tokens(prepared, model_dir):
    refused(run_cli("-m", "train.evaluate", "--model", str(prepared), "--data", str(prepared)),
            f"--model {prepared} is not a Hugging Face model directory")
    res = run_cli("-m", "train.evaluate", "--model", str(model_dir), "--data", str(prepared),
                  "--max-batches", "0")
    refused(res, "yields no labelled tokens")
    assert "perplexity" not in res.stdout


@pytest.mark.parametrize("out,fragment", [("missing/plot.png", "does not exist"),
                                          (".", "is a directory")])
def test_plot_to_a_place_it_cannot_write_is_refused(tmp_path, out, fragment):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n')
    res = run_cli("-m", "train.plot", str(tmp_path), "--out", str(tmp_path / out))
    refused(res, fragment)


@pytest.mark.slow
def test_a_corrupt_validation_shard_is_refused_like_a_train_shard(prepared, tmp_path):
    data = copy_data(prepared, tmp_path / "data")
    shard = data / "validation-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0xFF
    shard.write_bytes(bytes(raw))
    res = train_cli(data, tmp_path / "o", "max_steps=2", "per_device_train_batch_size=2")
    refused(res, f"shard {shard}", "checksum")
    assert not (tmp_path / "o").exists()  # a refused run leaves nothing behind (.watchdog too)


# ---------------------------------------------------------------------------------------------
# Ctrl-C is a clean stop
# ---------------------------------------------------------------------------------------------

def start_long_run(data: Path, out: Path):
    """A 2-rank run that would train for minutes, in the background, to be stopped."""
    from helpers import start_train

    return start_train(TINY, f"data.path={data}", f"output_dir={out}",
                       "per_device_train_batch_size=4", "logging_steps=5", "eval_max_batches=2",
                       "max_steps=2000", "eval_steps=1000", "save_steps=10000",
                       log=out.parent / f"{out.name}.log")


@pytest.mark.slow
def test_ctrl_c_stops_like_sigterm_with_a_checkpoint(stdlib_data, tmp_path):
    """SIGINT (what Ctrl-C sends every process of the terminal's group) to each rank mid-run: a
    collective checkpoint and one line saying so, status 0, no KeyboardInterrupt traceback."""
    import re
    import signal

    from helpers import logged_step, signal_ranks_when

    out = tmp_path / "run"
    proc = start_long_run(stdlib_data, out)
    signal_ranks_when(proc, lambda: logged_step(out) >= 5, "step 5", signal.SIGINT)
    log = Path(proc.log).read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    step = int(re.search(r"SIGINT: checkpoint saved at step (\d+)", log).group(1))
    assert (out / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------
# A full or read-only file system (a small tmpfs; mounting needs root)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB tmpfs at tmp_path/fs, unmounted afterwards."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI runs the tests as root)")
    mount = tmp_path / "fs"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_prepare_on_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(
        prepared, tmp_path, small_fs):
    import subprocess

    corpus = tmp_path / "big.jsonl"  # about 6 MB of text: more tokens than 2 MB hold
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "alpha beta gamma " * 40})
                              + "\n" for i in range(8000)))
    out = small_fs / "data"
    res = run_cli("-m", "train.prepare", "--input", str(corpus), "--output", str(out),
                  "--tokenizer", str(prepared / "tokenizer.json"), "--no-progress")
    refused(res, f"--output {out}: no space left", "MB free")
    assert not out.exists() and os.listdir(small_fs) == []
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    res = run_cli("-m", "train.prepare", "--input", str(corpus), "--output", str(out),
                  "--tokenizer", str(prepared / "tokenizer.json"), "--no-progress")
    refused(res, "read-only file system")


@pytest.mark.slow
def test_killing_torchrun_leaves_no_rank_behind(stdlib_data, tmp_path):
    """kill -9 of the top process: its ranks get SIGTERM from the kernel (PR_SET_PDEATHSIG) and
    stop cleanly, saving a checkpoint, instead of training on as orphans."""
    import signal

    import psutil

    from helpers import logged_step, ranks, wait_for

    out = tmp_path / "run"
    proc = start_long_run(stdlib_data, out)
    try:
        wait_for(lambda: logged_step(out) >= 5, 300, "step 5", proc)
        workers = [psutil.Process(pid) for pid in ranks(proc).values()]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=120)
        assert not alive, f"ranks still alive after their torchrun was killed: {alive}"
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            if "train" in " ".join(p.cmdline()):
                p.kill()
    log = Path(proc.log).read_text()
    assert "SIGTERM: checkpoint saved at step" in log, log[-3000:]
