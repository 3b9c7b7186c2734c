"""report_to: W&B, MLflow and TensorBoard beside metrics.jsonl (train/run/trackers.py), read back
with each tracker's own library and compared with metrics.jsonl step by step."""
from __future__ import annotations

import json
import struct
import time
from collections import defaultdict
from pathlib import Path

import pytest

from train.config import load_config, report_to_names
from train.errors import UsageError
from train.run import trackers
from train.run.trackers import Trackers

from helpers import TINY, read_metrics, run_cli, run_train

SECRET = "wandb_v1_NotARealKeyButSecret0123456789abcdef"  # a user's key, in the environment


# -- the forms of report_to ---------------------------------------------------------------------
@pytest.mark.parametrize("value,names", [
    ("none", []), ([], []), (["none"], []),
    ("wandb", ["wandb"]), ("wandb,mlflow", ["wandb", "mlflow"]),
    ("tensorboard, wandb", ["tensorboard", "wandb"]), (["mlflow", "mlflow"], ["mlflow"]),
    ("all", ["tensorboard", "wandb", "mlflow"]),  # all three are installed with the test extra
])
def test_report_to_takes_training_arguments_forms(value, names):
    assert report_to_names(value) == names


def test_report_to_refuses_an_unknown_tracker_naming_the_choices(stdlib_data, tmp_path):
    with pytest.raises(UsageError, match=r"report_to names 'comet'; choose none, all, or any of "
                                         r"tensorboard, wandb, mlflow"):
        load_config(TINY, [f"data.path={stdlib_data}", "report_to=[wandb,comet]"])


def test_preflight_refuses_a_tracker_that_is_not_installed(stdlib_data, tmp_path, monkeypatch):
    import importlib.util

    from train.run.preflight import preflight

    cfg = load_config(TINY, [f"data.path={stdlib_data}", f"output_dir={tmp_path}/run",
                             "report_to=wandb,mlflow"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UsageError, match=r"report_to asks for mlflow, which is not installed; "
                                         r"pip install 'slurm-lm\[mlflow\]'"):
        preflight(cfg, 1)


# -- a tracker never stalls or ends training ----------------------------------------------------
class Hangs:
    def __init__(self, out, run_id, params):
        self.id = "hangs"

    def log(self, step, values):
        time.sleep(3600)


class Raises(Hangs):
    def log(self, step, values):
        raise ConnectionError("api.example: 503\nsecond line not printed")


@pytest.mark.parametrize("opener,timeout_s,why", [
    (Raises, 120.0, "raised ConnectionError: api.example: 503; "),
    (Hangs, 0.1, "a call has not returned for 0 s")])
def test_a_failing_tracker_is_reported_once_and_dropped(tmp_path, monkeypatch, capsys,
                                                        opener, timeout_s, why):
    monkeypatch.setitem(trackers.OPENERS, "wandb", opener)
    monkeypatch.setattr(trackers, "CALL_TIMEOUT_S", timeout_s)
    log = Trackers(["wandb"], tmp_path, resumed=False, params={})
    started = time.monotonic()
    for step in range(1, 50):
        log.log({"step": step, "loss": 1.0})
        time.sleep(0.01)
    log.finish({}, timeout_s=1.0)
    assert time.monotonic() - started < 5  # the loop never waited for the tracker
    warnings = [l for l in capsys.readouterr().err.splitlines() if "report_to wandb" in l]
    assert len(warnings) == 1 and why in warnings[0], warnings
    assert "second line" not in warnings[0]


def test_a_resumed_tracker_continues_its_run_and_sends_each_step_once(tmp_path, monkeypatch):
    sent = []

    class Records(Hangs):
        def __init__(self, out, run_id, params):
            self.id = run_id or "run-1"

        def log(self, step, values):
            sent.append((self.id, step))

        def finish(self, summary):
            pass

    monkeypatch.setitem(trackers.OPENERS, "mlflow", Records)
    first = Trackers(["mlflow"], tmp_path, resumed=False, params={})
    for step in (1, 2, 3):
        first.log({"step": step, "loss": 1.0})
    first.finish({})
    second = Trackers(["mlflow"], tmp_path, resumed=True, params={})  # a kill after step 3,
    for step in (2, 3, 4):                                             # a checkpoint at step 1
        second.log({"step": step, "loss": 1.0})
    second.finish({})
    assert sent == [("run-1", 1), ("run-1", 2), ("run-1", 3), ("run-1", 4)]
    fresh = Trackers(["mlflow"], tmp_path, resumed=False, params={})  # resume: never
    fresh.log({"step": 1, "loss": 1.0})
    fresh.finish({})
    assert sent[-1] == ("run-1", 1) and json.loads((tmp_path / "trackers.json").read_text()) \
        == {"mlflow": {"run_id": "run-1", "step": 1}}


# -- reading each tracker back with its own library ---------------------------------------------
def wandb_rows(out: Path) -> tuple[set[str], list[tuple[int, dict]]]:
    """The run ids and history rows (step, {key: value}) of every offline .wandb file in
    output_dir/wandb, in the order they were written. The file is W&B's LevelDB-style log
    (wandb/sdk/internal/datastore.py until wandb 0.2x): a 7-byte file header, then 32 KiB
    blocks of records, each a 7-byte header (crc32c, length, type) and a piece of a
    protobuf `Record` of wandb's own wandb_internal_pb2."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    ids, rows = set(), []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        ident, magic, version = struct.unpack("<4sHB", data[:header])
        assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), path
        pos, pieces = header, b""
        while pos + header <= len(data):
            if block - pos % block < header:  # a block's tail too short for a header: padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
            if length == 0 and kind == 0:
                break
            pieces += data[pos + header:pos + header + length]
            pos += header + length
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pieces)
                pieces = b""
                if record.WhichOneof("record_type") == "run":
                    ids.add(record.run.run_id)
                elif record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item}
                    rows.append((record.history.step.num,
                                 {k: v for k, v in items.items() if not k.startswith("_")}))
    return ids, rows


def by_step(records: list[dict]) -> dict[int, dict]:
    merged = defaultdict(dict)
    for r in records:
        merged[r["step"]].update(trackers.scalars(r))
    return dict(merged)


def no_duplicates(rows: list[tuple[int, dict]]) -> dict[int, dict]:
    steps = [step for step, _ in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return dict(rows)


# the numbers a resume reproduces; the others (tokens/s, elapsed, FLOP rates, rank timings) are
# wall-clock measurements of whichever attempt ran the step
REPRODUCED = ("loss", "lr", "grad_norm", "real_tokens_seen", "eval_loss", "perplexity",
              "eval_tokens")


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_log_one_run_per_tracker_equal_to_metrics(
        stdlib_data, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["max_steps=8", "per_device_train_batch_size=2", "logging_steps=2", "eval_steps=4",
            "save_steps=4", "eval_max_batches=2", "report_to=[wandb,mlflow,tensorboard]"]
    env = {"WANDB_API_KEY": SECRET, "MLFLOW_TRACKING_TOKEN": SECRET}
    # rank 1 dies after step 6: the checkpoint is step 4. Rank 0's steps are slowed so that its
    # trackers (a few seconds to open) are likely to have been sent steps 5-6, which then run
    # twice; a tracker that had not caught up gets the kept records on resume.
    killed = run_train(TINY, f"data.path={stdlib_data}", f"output_dir={out}", *args,
                       env={**env, "TRAIN_FAULT_RAISE_AT": "1:6", "TRAIN_FAULT_SLOW_RANK": "0:2"})
    assert killed.returncode != 0
    state = out / "trackers.json"
    sent_first = json.loads(state.read_text()) if state.exists() else {}
    print("sent before the kill:", sent_first)
    res = run_train(TINY, f"data.path={stdlib_data}", f"output_dir={out}", *args, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "report_to" not in res.stderr  # no tracker was dropped
    expected = by_step(read_metrics(out))
    assert sorted(expected) == [0, 2, 4, 6, 8]
    ids = json.loads((out / "trackers.json").read_text())

    def check(name: str, logged: dict[int, dict], rel: float = 0.0):
        assert sorted(logged) == sorted(expected), name
        # the steps after the checkpoint that the tracker was sent before the kill ran twice:
        # it kept the first attempt's, metrics.jsonl the second's (TensorBoard purges them)
        reran = range(5, sent_first.get(name, {}).get("step", 4) + 1)
        for step, values in expected.items():
            assert set(logged[step]) == set(values), (name, step)
            keys = [k for k in values if step not in reran or k in REPRODUCED]
            for key in keys:
                assert logged[step][key] == pytest.approx(values[key], rel=rel), (name, step, key)

    run_ids, rows = wandb_rows(out)
    assert run_ids == {ids["wandb"]["run_id"]}
    assert len(list(out.glob("wandb/offline-run-*"))) == 2  # both attempts, one run
    check("wandb", no_duplicates(rows))

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]
    run = runs[0]
    assert run.data.params["max_steps"] == "8" and run.data.tags["summary.steps"] == "8"
    logged = defaultdict(dict)
    for key in run.data.metrics:
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for step, value in no_duplicates([(s, {key: v}) for s, v in history]).items():
            logged[step].update(value)
    check("mlflow", logged)

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = defaultdict(dict)
    for tag in events.Tags()["scalars"]:
        for step, value in no_duplicates([(e.step, {tag: e.value})
                                          for e in events.Scalars(tag)]).items():
            logged[step].update(value)
    # TensorBoard purges the first attempt's steps after the checkpoint, as metrics.jsonl does;
    # it stores float32 (24-bit mantissa: 2^-24 relative, doubled for the rounding either way)
    check("tensorboard", logged, rel=2**-23)
    for f in out.rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f


def test_trackers_get_the_resolved_config_and_the_slurm_job_as_parameters(tmp_path,
                                                                         monkeypatch):
    got = {}

    class Keeps(Hangs):
        def __init__(self, out, run_id, params):
            self.id = "run"
            got.update(params)

    monkeypatch.setitem(trackers.OPENERS, "wandb", Keeps)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    log = Trackers(["wandb"], tmp_path, resumed=False,
                   params={"max_steps": 8, "model": {"config": {"n_layer": 2}}, "bf16": False})
    log.finish({}, timeout_s=10)
    assert got == {"max_steps": "8", "model.config.n_layer": "2", "bf16": "false",
                   "slurm_job_id": "4242", "slurm_nodes": "node[1-2]"}


def test_other_ranks_never_import_a_tracker(tmp_path):
    code = ("import sys; from pathlib import Path; from train.run.metrics import MetricsLog\n"
            f"log = MetricsLog(Path({str(tmp_path)!r}), rank=1, report_to=['wandb', 'mlflow'])\n"
            "log.start(None); log.log({'step': 1, 'loss': 1.0}); log.close({})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))")
    res = run_cli("-c", code, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]" and list(tmp_path.iterdir()) == []
