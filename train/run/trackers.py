"""W&B and MLflow beside metrics.jsonl (report_to), on rank 0 only; TensorBoard's writer stays
in train/run/metrics.py, which fans every record out to these.

A tracker never stalls or ends training. Each runs on its own worker thread behind a bounded
queue: the loop only enqueues, so the watchdog, which watches the main thread, never sees a
tracker's time. A tracker whose call raises, runs past CALL_TIMEOUT_S or falls QUEUE_SIZE calls
behind is reported in one line and dropped; training goes on with metrics.jsonl and the others.
The libraries are imported on that thread, so other ranks never import them.

Offline by default (compute nodes often have no network): W&B in `WANDB_MODE=offline` unless the
environment says otherwise (`wandb sync output_dir/wandb/offline-run-*` uploads it later),
MLflow to a SQLite file, output_dir/mlflow.db (MLflow 3's local store: its directory store
is in maintenance mode and refused by default), unless `MLFLOW_TRACKING_URI` is set. Nothing from
the environment is logged but the Slurm job id and nodes: no API key reaches a tracker.

One run across requeues and resumes: each tracker's run id is kept in output_dir/trackers.json
with the last step it was sent. A resumed job continues that run and sends only later steps, so
no step is logged twice; it first sends the kept records of metrics.jsonl that the tracker had
not got (a job killed before its trackers caught up). After a hard kill between checkpoints,
metrics.jsonl keeps the re-run's records of the steps since the checkpoint; a tracker keeps
those it was sent first (the same loss, lr and grad norm, as a resume reproduces the run; the
timings of the first attempt).
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

from train.errors import warn
from train.run.config_drift import flatten

STATE = "trackers.json"
CALL_TIMEOUT_S = 120.0  # a W&B or MLflow call on a local disk takes milliseconds
QUEUE_SIZE = 1000       # logging steps and evals a slow tracker may lag behind
PROJECT = "slurm-lm"    # the W&B project and MLflow experiment unless the environment names one


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record, without its step: what a tracker logs."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float))}


def as_params(config: dict) -> dict[str, str]:
    """A nested config as {dotted.key: text}: a tracker's parameters."""
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in flatten(config).items()}


def slurm_fields() -> dict[str, str]:
    """The job's Slurm id and nodes, when it runs under Slurm."""
    names = {"slurm_job_id": "SLURM_JOB_ID", "slurm_nodes": "SLURM_JOB_NODELIST"}
    return {key: os.environ[var] for key, var in names.items() if os.environ.get(var)}


class WandbRun:
    """A W&B run, offline unless WANDB_MODE says otherwise, continued by its id."""

    def __init__(self, out: Path, run_id: str | None, params: dict):
        import wandb

        self.run = wandb.init(
            dir=str(out), id=run_id, resume="allow",
            mode=os.environ.get("WANDB_MODE", "offline"),
            project=os.environ.get("WANDB_PROJECT", PROJECT), name=out.resolve().name,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.run.config.update(params, allow_val_change=True)
        self.id = self.run.id

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update(summary)
        self.run.finish()


class MlflowRun:
    """An MLflow run in output_dir/mlflow.db (or MLFLOW_TRACKING_URI), continued by its id."""

    def __init__(self, out: Path, run_id: str | None, params: dict):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.local_store(out, MlflowClient)
        self.client = MlflowClient(uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else None
            if experiment_id is None:
                artifacts = (out / "mlartifacts").resolve().as_uri()
                experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
            run_id = self.client.create_run(experiment_id,
                                            run_name=out.resolve().name).info.run_id
            logged = {}
        else:
            self.client.update_run(run_id, status="RUNNING")
            logged = self.client.get_run(run_id).data.params
        # a parameter cannot change once logged: what a resume changed becomes a tag
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"resumed_with.{k}", v) for k, v in params.items()
                   if k in logged and logged[k] != v]
        for i in range(0, max(len(new), len(changed)), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=new[i:i + 100], tags=changed[i:i + 100])
        self.id = run_id

    @staticmethod
    def local_store(out: Path, client_class) -> str:
        """output_dir/mlflow.db, its tables created under a temporary name first: a job killed
        while MLflow creates them (seconds on a busy node) leaves no half-made database."""
        db = (out / "mlflow.db").resolve()
        if not db.exists():
            tmp = db.with_name(".mlflow.db.tmp")
            tmp.unlink(missing_ok=True)
            client_class(f"sqlite:///{tmp}").search_experiments()  # creates the tables
            os.replace(tmp, db)
        return f"sqlite:///{db}"

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.id, metrics=metrics[i:i + 1000])

    def finish(self, summary: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(f"summary.{k}", str(v))
                                             for k, v in summary.items()])
        self.client.set_terminated(self.id)


OPENERS = {"wandb": WandbRun, "mlflow": MlflowRun}


class RunState:
    """output_dir/trackers.json: each tracker's run id and the last step it was sent."""

    def __init__(self, out: Path, resumed: bool):
        self.path, self.lock = out / STATE, threading.Lock()
        self.state = json.loads(self.path.read_text()) if resumed and self.path.exists() else {}
        if not resumed:
            self.path.unlink(missing_ok=True)

    def get(self, name: str) -> dict:
        return dict(self.state.get(name, {}))

    def set(self, name: str, **fields) -> None:
        with self.lock:
            self.state.setdefault(name, {}).update(fields)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=1) + "\n")
            os.replace(tmp, self.path)


class Tracker:
    """One tracker on its worker thread: opened there, fed through a bounded queue."""

    def __init__(self, name: str, out: Path, state: RunState, params: dict):
        self.name, self.state = name, state
        self.sent = state.get(name).get("step", -1)  # steps up to this one were logged before
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.busy_since: float | None = None
        self.dropped = False
        self.run = None
        self.put(self.open, out, params)
        self.thread = threading.Thread(target=self.work, name=f"tracker-{name}", daemon=True)
        self.thread.start()

    def open(self, out: Path, params: dict) -> None:
        self.run = OPENERS[self.name](out, self.state.get(self.name).get("run_id"), params)
        self.state.set(self.name, run_id=self.run.id)

    def send(self, step: int, values: dict) -> None:
        self.run.log(step, values)
        self.state.set(self.name, step=step)

    def log(self, step: int, values: dict, late: bool = False) -> None:
        """late: an earlier step's numbers (an eval job's, merged once): sent as they are,
        the last step sent stays the last training step's."""
        if not values or (step <= self.sent and not late):
            return
        self.put(self.run.log if late else self.send, step, values)

    def finish(self, summary: dict, timeout_s: float) -> None:
        self.put(lambda: self.run.finish(summary))
        self.put(None)
        if self.dropped:  # hung or failed: nothing to wait for
            return
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.drop(f"did not finish within {timeout_s:.0f} s")

    def put(self, call, *args) -> None:
        if self.dropped:
            return
        if self.busy_since is not None and time.monotonic() - self.busy_since > CALL_TIMEOUT_S:
            return self.drop(f"a call has not returned for {CALL_TIMEOUT_S:.0f} s")
        try:
            self.queue.put_nowait(None if call is None else (call, args))
        except queue.Full:
            self.drop(f"fell {QUEUE_SIZE} calls behind")

    def work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.dropped:
                return
            call, args = item
            self.busy_since = time.monotonic()
            try:
                call(*args)
            except Exception as err:  # a tracker's failure is never training's
                first_line = (str(err).splitlines() or [""])[0][:200]
                return self.drop(f"raised {type(err).__name__}: {first_line}")
            finally:
                self.busy_since = None

    def drop(self, why: str) -> None:
        if not self.dropped:
            self.dropped = True
            warn(f"report_to {self.name} {why}; it is dropped, training goes on "
                 f"(metrics.jsonl has every record)")


class Trackers:
    """The trackers of report_to but TensorBoard, on rank 0; empty elsewhere."""

    def __init__(self, names: list[str], out: Path, resumed: bool, params: dict):
        names = [n for n in names if n in OPENERS]
        state = RunState(out, resumed) if names else None
        params = {**as_params(params), **slurm_fields()}
        self.trackers = [Tracker(n, out, state, params) for n in names]

    def log(self, record: dict, late: bool = False) -> None:
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(record["step"], values, late)

    def finish(self, summary: dict, timeout_s: float = CALL_TIMEOUT_S) -> None:
        """Send the summary and close each run; the second call does nothing."""
        for tracker in self.trackers:
            tracker.finish(summary, timeout_s)
        self.trackers = []
