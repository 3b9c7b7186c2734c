"""Hangs, stop signals and slow ranks under torchrun (2 CPU ranks, ZeRO-2): a rank frozen with
SIGSTOP (no hook in the product) ends the job through the watchdog, naming it; SIGTERM in each
start-up phase and mid-run is a clean stop; a slowed rank is named in metrics.jsonl and one
warning line. The Slurm side (requeues, walltime, the crash-loop limit) is in test_slurm.py."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from helpers import (TINY, logged_step, ranks, read_metrics, run_cli, signal_ranks_when,
                     start_train, wait_for)
from train.run.checkpoint import latest

pytestmark = pytest.mark.slow
SHORT = ["per_device_train_batch_size=4", "logging_steps=5", "eval_max_batches=2"]


def start(data: Path, out: Path, *overrides: str, env: dict | None = None):
    """torchrun with 2 ranks in the background; its output goes to out/../NAME.log."""
    return start_train(TINY, f"data.path={data}", f"output_dir={out}", *SHORT, *overrides,
                       log=out.parent / f"{out.name}.log", env=env)


def in_phase(out: Path, phase: str) -> bool:
    """Both ranks' heartbeats (train/run/watchdog.py) say they are in `phase`."""
    try:
        beats = [json.loads((out / ".watchdog" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    except (OSError, ValueError):
        return False
    return all(b["phase"] == phase for b in beats)


def test_a_frozen_rank_is_named_and_the_job_ends_within_the_step_timeout(stdlib_data, tmp_path):
    """Also the straggler report: rank 1 sleeps 100 ms per step (TRAIN_FAULT_SLOW_RANK)."""
    out = tmp_path / "frozen"
    proc = start(stdlib_data, out, "max_steps=2000", "eval_strategy=no", "save_steps=10000",
                 "watchdog.step_floor_s=10", "stragglers.windows=2", "stragglers.warn_every=1000",
                 # 2 ranks: the spread is max / mean, below 2 however slow one is; a step's own
                 # work is ~0.05-0.2 s here, so 0.1 s more makes 1.3-1.7x
                 "stragglers.ratio=1.2", env={"TRAIN_FAULT_SLOW_RANK": "1:0.1"})
    try:
        wait_for(lambda: logged_step(out) >= 20, 240, "step 20", proc, every=0.2)
        frozen = ranks(proc)[0]
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.time()
        proc.wait(timeout=10 + 60)
        ended = time.time() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in ranks(proc).values() if proc.poll() is None else ():
            os.kill(pid, signal.SIGKILL)
    log = proc.log.read_text()
    assert proc.returncode != 0
    assert ended < 70, ended  # the step timeout (10 s) + 60 s
    print(f"ended {ended:.0f} s after the SIGSTOP")
    # torchrun reports the watchdog's exit status for rank 1
    assert re.search(r"exitcode\s*:\s*75", log), log[-3000:]
    line = [ln for ln in log.splitlines() if "watchdog: step at step" in ln]  # maybe after tqdm's
    assert len(line) == 1, log[-5000:]
    assert "made no progress" in line[0] and "on rank 1" in line[0]
    assert "ranks that did not arrive: 0 (host " in line[0] and f"pid {frozen}: silent" in line[0]
    assert "Python stacks of rank 1" in log and "most recent call first" in log
    assert "train/run/trainer.py" in log  # the live rank's stack shows where it waits
    # no process left behind: the frozen rank was killed by torchrun
    assert not Path(f"/proc/{frozen}").exists() or \
        "Z" in Path(f"/proc/{frozen}/stat").read_text().split()[2]

    # the slow rank, in metrics.jsonl at every logging step and in one warning line
    records = [r for r in read_metrics(out) if "loss" in r]
    for key in ("slowest_rank", "slowest_host", "slowest_rank_step_s", "median_rank_step_s",
                "rank_spread"):
        assert key in records[0], key
    assert sum(r["slowest_rank"] == 1 for r in records) >= 0.8 * len(records)
    for r in records:
        assert r["rank_spread"] == pytest.approx(r["slowest_rank_step_s"] / r["median_rank_step_s"])
        if r["slowest_rank"] == 1:  # rank 1 sleeps 0.1 s per step in its own work
            assert r["slowest_rank_step_s"] >= 0.1
    warnings = [ln for ln in log.splitlines() if "is a straggler" in ln]
    assert len(warnings) == 1, warnings  # at most once per warn_every (1000) steps
    assert "warning: rank 1 on " in warnings[0]


def test_sigterm_in_each_start_up_phase_and_mid_run_is_a_clean_stop(stdlib_data, tmp_path):
    """One output_dir through four runs: SIGTERM during start-up, during the step-0 eval, mid-run
    (a collective save), during the checkpoint load. Each run stops cleanly (status 0 outside
    Slurm) and the latest complete checkpoint is always the one the mid-run stop saved."""
    out = tmp_path / "run"
    common = ["max_steps=2000", "eval_steps=1000", "save_steps=10000"]

    def stop_in(phase: str | None, expected: str):
        proc = start(stdlib_data, out, *common,
                     env={"TRAIN_FAULT_DELAY": f"{phase}:5"} if phase else {})
        if phase:
            signal_ranks_when(proc, lambda: in_phase(out, phase), phase, signal.SIGTERM)
        else:
            signal_ranks_when(proc, lambda: logged_step(out) >= 10, "step 10", signal.SIGTERM)
        log = Path(proc.log).read_text()
        assert proc.returncode == 0, log[-3000:]
        assert re.search(expected, log), log[-3000:]
        return log

    stop_in("start-up", r"SIGTERM: stopped after start-up, before any step; nothing new to save "
                        r"\(resumes from the start\)")
    assert latest(out) is None
    stop_in("eval", r"SIGTERM: stopped after the step-0 eval, before any step")
    assert latest(out) is None
    log = stop_in(None, r"SIGTERM: checkpoint saved at step \d+")
    step = int(re.search(r"SIGTERM: checkpoint saved at step (\d+)", log).group(1))
    saved = out / "checkpoints" / f"step-{step:08d}"
    assert (saved / "trainer_state.json").exists()
    stop_in("checkpoint load", rf"SIGTERM: stopped after checkpoint load, before any step; "
                               rf"nothing new to save \(resumes from {saved}\)")
    assert latest(out) == saved


PROGRESSING = """
import sys, time
from pathlib import Path
from train.config import WatchdogSection
from train.run.watchdog import Watchdog, tree_bytes

out = Path(sys.argv[1])
# limits below the config's 10 s floor, to keep this test short: the rule is the same
dog = Watchdog(out, 0, 1, WatchdogSection(eval_s=4, checkpoint_s=4))
dog.enter("eval", 3)
for _ in range(6):                      # an eval 1.5 x as long as its limit, batch after batch
    time.sleep(1)
    dog.beat()
saving = out / "checkpoints"
saving.mkdir()
dog.enter("checkpoint save", 3, probe=lambda: tree_bytes(saving))
for i in range(6):                      # a save 1.5 x as long as its limit, writing all along
    time.sleep(1)
    (saving / f"part-{i}").write_bytes(b"x" * 1000)
print("progressing phases passed", flush=True)
time.sleep(60)                          # then no progress at all
"""


def test_a_long_but_progressing_eval_or_save_does_not_trip_the_watchdog(tmp_path):
    res = run_cli("-c", PROGRESSING, str(tmp_path), timeout=120)
    assert res.returncode == 75, res.stderr[-3000:]
    assert "progressing phases passed" in res.stdout
    assert re.search(r"watchdog: checkpoint save at step 3 made no progress for \d+ s \(limit 4 s\) "
                     r"on rank 0 \(.*\); ranks that did not arrive: none", res.stderr), res.stderr
    assert "Python stacks of rank 0" in res.stderr
