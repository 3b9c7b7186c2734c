"""One rank of a run: `run_training(cfg)`, the training loop, top to bottom.

    python -m train configs/tiny-clm.yaml                 # what calls it (train/__main__.py)

The phases, each in its own module:
  1. where this rank is (train/run/distributed.py) and everything checkable before the job
     (train/run/preflight.py: config, data vs tokenizer vs model, positions, steps, output_dir);
  2. the model (train/model.py), the loader (train/data/loader.py), the process group and the
     DeepSpeed engine (train/run/engine.py); resume from the latest complete checkpoint, also under
     another world size (train/run/checkpoint.py);
  3. the steps: accumulation micro-batches, the loss as a true token average over ranks and
     micro-batches, metrics (train/run/metrics.py) with the slowest rank (train/run/stragglers.py), eval
     (train/run/eval_loop.py), checkpoints, and an early stop all ranks agree on (train/run/preemption.py),
     also at the end of each start-up phase;
  4. the final eval and checkpoint, the export of output_dir/final/ (train/run/export.py).
Throughout, a watchdog thread (train/run/watchdog.py) ends the job if a phase stops making progress.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train import durable
from train.run import checkpoint, distributed, health, preemption, run_dir, run_lock
from train.config import Config, report_to_names
from train.run.engine import build_engine, device_memory, pick_device, start_process_group
from train.errors import DataError, UsageError, note
from train.run.eval_loop import eval_metrics, eval_metrics_by_source
from train.run.figure import plot_runs
from train.run.faults import Faults
from train.flops import Throughput
from train.data.loader import IGNORE_INDEX, PackedLoader, as_torch
from train.run.metrics import MetricsLog
from train.data.mixture import MixtureLoader
from train.model import build_hf_model
from train.run.preemption import StopReason, StopRequest
from train.run.preflight import Plan, data_sources, preflight
from train.run.stragglers import Stragglers, WorkTimer
from train.run.watchdog import DIR as WATCHDOG_DIR, Watchdog, tree_bytes


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm under nonfinite: stop."""


@dataclass
class Progress:
    """What the loop carries from step to step, and a checkpoint saves beside the engine."""

    step: int = 0
    real_tokens_seen: list[int] = field(default_factory=list)  # per data source; no padding
    skipped: list[int] = field(default_factory=list)  # steps with a skipped micro-batch
    # the logging window in progress: saved, so that a stop between two logging steps changes
    # no logged loss
    pending_loss: float = 0.0
    pending_tokens: float = 0.0
    trained_tokens_seen: int = 0  # labelled tokens up to the last logging step (task sft logs it)


def run_training(cfg: Config) -> int:
    preemption.install_handlers()  # python -m train did it already, before the heavy imports
    env = distributed.from_environment()
    gpu_bytes = device_memory(env.local_rank)
    plan = preflight(cfg, env.world_size, device_bytes=gpu_bytes)
    if env.rank == 0:
        print(plan.memory.render(gpu_bytes), file=sys.stderr)
        if plan.memory_verdict:
            print(f"warning: {plan.memory_verdict[1]}", file=sys.stderr)
    env.export()  # after preflight: a refused run leaves its caller's environment as it was
    out = Path(cfg.output_dir)
    new_dir = env.rank == 0 and not out.exists()
    try:
        return run_rank(cfg, plan, env)
    except UsageError:
        # refused while starting (a corrupt shard, say): a directory this run made goes with it
        if new_dir and checkpoint.latest(out) is None and not (out / "final").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def run_rank(cfg: Config, plan: Plan, env: distributed.DistEnv) -> int:
    """The run after preflight: output_dir held, the watchdog on, the process group up."""
    with contextlib.ExitStack() as held:  # undone in reverse: process group, watchdog, lock
        out = Path(cfg.output_dir)
        if env.rank == 0:  # rank 0 holds output_dir; only then does it clear what a run left
            before = set(os.listdir(out)) if out.is_dir() else set()
            run_dir.mark(cfg.output_dir)  # preflight found it new, empty or a run directory
            holder = run_lock.acquire(cfg.output_dir)
            held.callback(run_lock.release, cfg.output_dir, holder)
            # after the watchdog's close, before the lock goes: a refused start leaves nothing
            held.push(lambda kind, err, tb: leave_nothing_behind(out, before, err))
            checkpoint.take_over(cfg.output_dir, set_aside=cfg.overwrite_output_dir)
            checkpoint.set_damaged_aside(plan.damaged)
        else:
            held.push(lambda kind, err, tb: leave_nothing_behind(out, None, err))
        job = preemption.slurm_job_id()
        watchdog = Watchdog(
            Path(cfg.output_dir), env.rank, env.world_size, cfg.watchdog,
            requeue=(lambda cause: preemption.requeue(job, Path(cfg.output_dir),
                                                      cfg.requeue_without_progress, cause))
            if job else None)
        held.callback(watchdog.close)
        run = RankRun(plan, env.rank, pick_device(env.local_rank), watchdog)
        held.callback(run.metrics.close)  # a stop or a failure: flush the trackers briefly
        held.callback(end_process_group)
        try:
            start_process_group(run.device, env, Path(cfg.output_dir))
        except distributed.RendezvousTimeout as err:  # the first sign of an unshared output_dir
            raise health.NodeHealthError(
                f"node health: host {distributed.host_name()}: output_dir: {err}") from None
        health.check_nodes(plan, env.rank, run.device, run.hf_model)
        stopped = run.start()
        return run.loop() if stopped is None else stopped


def leave_nothing_behind(out: Path, before: set[str] | None, err) -> None:
    """A start refused with a UsageError (a corrupt shard, a tokenizer that does not match...)
    before any checkpoint or export: rank 0 removes the names it added to output_dir (the
    marker, metrics.jsonl...; `before` is what was there), every rank the watchdog's directory
    once it is empty (the last rank out removes it). A directory this run made goes whole
    (run_training)."""
    if not isinstance(err, UsageError) or not out.is_dir():
        return
    if checkpoint.latest(out) is not None or (out / "final").exists():
        before = None  # a run's results: keep them, and what the run wrote beside them
    for name in sorted(set(os.listdir(out)) - before) if before is not None else []:
        if name not in (WATCHDOG_DIR, run_lock.LOCK_NAME):  # the lock goes with its release
            durable.remove_tree(out / name)
    try:
        os.rmdir(out / WATCHDOG_DIR)  # only when empty: another rank's heartbeat is its own
    except OSError:
        pass


def end_process_group():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class RankRun:
    """The pieces of one rank's run, and the loop over them."""

    def __init__(self, plan: Plan, rank: int, device: torch.device, watchdog: Watchdog):
        cfg = plan.cfg
        self.plan, self.cfg, self.rank, self.world, self.device = plan, cfg, rank, plan.world, device
        self.out, self.task, self.watchdog = Path(cfg.output_dir), plan.task, watchdog
        self.faults = Faults.from_environment()
        self.faults.delay_phase("start-up")
        self.stop = StopRequest(rank)
        self.work = WorkTimer(device)
        self.hf_model = build_hf_model(cfg.model, plan.hf_config, plan.task.auto_class,
                                       plan.task.model_kwargs(), cfg.seed)
        self.sources = data_sources(cfg)
        self.loader = self.open_loader("train", cfg.per_device_train_batch_size, shuffle=True,
                                       verify=cfg.data.verify)
        self.eval_loaders = None  # opened at the first eval: it scans the split's EOSes
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out, rank, report_to_names(cfg.report_to),
                                  params=cfg.to_dict())
        # counted now, before DeepSpeed partitions the parameters (ZeRO-3 leaves empty shards)
        self.throughput = Throughput.of(self.hf_model, causal=self.task.name in ("clm", "sft"),
                                        device=device, bf16=cfg.bf16 or cfg.fp16,
                                        peak_override=cfg.mfu_peak_tflops,
                                        window=cfg.data.seq_len)

    def open_loader(self, split: str, batch_size: int, shuffle: bool, verify: str,
                    path: str | None = None) -> PackedLoader | MixtureLoader:
        """The data.path (or `path`) loader of a split, or data.mixture's when there is one."""
        options = dict(seq_len=self.cfg.data.seq_len, micro_batch_size=batch_size, rank=self.rank,
                       world_size=self.world, seed=self.cfg.seed, shuffle=shuffle, verify=verify,
                       max_positions=self.plan.max_positions, **self.task.loader_options())
        if path is None and self.cfg.data.mixture is not None:
            return MixtureLoader(self.cfg.data.mixture, split, **options)
        return PackedLoader(path or self.cfg.data.path, split, **options)

    def start(self) -> int | None:
        """The engine (collective), then the state to continue from, then the eval before
        training. A stop asked for meanwhile (a signal, the walltime) ends the run after the
        phase it came in: its exit status is returned; None goes on to the loop."""
        self.engine, self.model, self.scheduler = build_engine(
            self.cfg, self.hf_model, self.plan.ds_config, self.plan.total_steps)
        self.hosts = self.gather_hosts()
        self.stragglers = Stragglers(self.hosts, self.cfg.stragglers, self.rank)
        self.progress = Progress(real_tokens_seen=[0] * len(self.sources))
        self.saved_step = None  # a stop on a save step must not save (and replace) it again
        if (code := self.stop_between_phases("start-up")) is not None:
            return code
        if self.plan.resume_from is not None:
            self.watchdog.enter("checkpoint load", 0)
            self.faults.delay_phase("checkpoint load")
            self.progress = self.load(self.plan.resume_from)
            if (code := self.stop_between_phases("checkpoint load")) is not None:
                return code
        self.metrics.start(self.progress.step if self.plan.resume_from is not None else None)
        if self.plan.has_val and self.progress.step == 0:  # perplexity before training, as the
            self.watchdog.enter("eval", 0)                 # course shows
            self.faults.delay_phase("eval")
            self.metrics.log({"step": 0, **self.run_eval()})
            return self.stop_between_phases("the step-0 eval")
        return None

    def stop_between_phases(self, phase: str) -> int | None:
        """Before the first step: a stop all ranks agree on ends the run with nothing to save
        (nothing was trained since the checkpoint it resumed from)."""
        reason = self.agree_to_stop(self.stop.local_reason(self.progress.step, starting=True))
        if reason is None:
            return None
        latest = checkpoint.latest(self.out)
        return self.stop.requeue(reason, self.out, self.cfg.requeue_without_progress,
                                 f"stopped after {phase}, before any step; nothing new to save "
                                 f"(resumes from {latest or 'the start'})")

    # -- the loop -------------------------------------------------------------------------------
    def loop(self) -> int:
        cfg, plan, p = self.cfg, self.plan, self.progress
        train_iter = iter(self.loader)
        eval_every = cfg.eval_steps or cfg.logging_steps
        pending = torch.tensor([p.pending_loss, p.pending_tokens], device=self.device,
                               dtype=torch.float64)  # [loss sum, tokens] of the logging window
        self.counted = self.loader.consumed  # p.real_tokens_seen counts the samples before it
        started = window_start = time.time()
        window_steps = 0
        work = [0, 0]  # this rank's [real tokens, attended pairs] of the logging window
        bar = self.progress_bar()
        first = True
        while p.step < plan.total_steps:
            self.watchdog.enter("first step" if first else "step", p.step + 1)
            first = False
            loss_sum, tokens, skipped, step_work = self.train_step(train_iter)
            p.step += 1
            if skipped:
                p.skipped.append(p.step)
            window_steps += 1
            pending += torch.stack([loss_sum.double(), tokens.double()])
            work = [a + b for a, b in zip(work, step_work)]  # host ints: no per-step copy
            bar.update(1)
            if p.step % cfg.logging_steps == 0 or p.step == plan.total_steps:
                now = time.time()
                seconds = max(now - window_start, 1e-9)
                # model FLOPs of the window over all ranks: tokens and pairs summed, and the
                # labelled tokens that reached the head (pending[1], already global)
                real, pairs = self.all_reduce(torch.tensor(work, dtype=torch.float64,
                                                           device=self.device)).tolist()
                rates = self.throughput.rates(real, float(pending[1]), pairs, seconds, self.world)
                self.count_real_tokens()
                rates.update(self.stragglers.fields(p.step, self.per_rank(
                    self.work.take() / window_steps)))
                record = self.log_step(pending, window_steps * plan.tokens_per_step / seconds,
                                       now - started, rates)
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False,
                                **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
                self.merge_evals()
                pending.zero_()
                work = [0, 0]
                window_start, window_steps = now, 0
            if plan.has_val and p.step % eval_every == 0 and p.step < plan.total_steps:
                self.watchdog.enter("eval", p.step)
                self.metrics.log({"step": p.step, **self.run_eval()})
            if p.step % cfg.save_steps == 0 and p.step < plan.total_steps:
                self.save(pending)
                self.downstream_eval()
            self.faults.after_step(self.rank, p.step)
            reason = self.agree_to_stop(self.stop.local_reason(p.step))
            if reason and p.step < plan.total_steps:
                self.save(pending)
                bar.close()
                return self.stop.requeue(reason, self.out, cfg.requeue_without_progress,
                                         f"checkpoint saved at step {p.step}")
        bar.close()
        if plan.has_val:
            self.watchdog.enter("eval", p.step)
            self.metrics.log({"step": p.step, **self.run_eval()})
        self.save(pending)
        self.count_real_tokens()  # for the summary, when save() found this step saved already
        self.downstream_eval()
        self.merge_evals(ended=True)
        self.export()
        if self.metrics.active:  # the figure next to metrics.jsonl (train/run/figure.py)
            plot_runs([self.out])
        self.metrics.finish(p.step, self.out / "final", self.task.headline_metric,
                            dict(zip(self.source_names(), p.real_tokens_seen)))
        return 0

    def count_real_tokens(self) -> None:
        """Brings p.real_tokens_seen up to the loader's position: the real tokens of the global
        samples drawn since the last count, all ranks', from the order alone (no collective).
        Called where the count is read (a logging step, a save, the end), not per step: one
        count over a window is the sum of the per-step counts, at a fraction of the host work."""
        p, consumed = self.progress, self.loader.consumed
        if consumed != self.counted:
            p.real_tokens_seen = (self.loader.real_tokens_by_source(self.counted, consumed)
                                  + p.real_tokens_seen).tolist()
            self.counted = consumed

    def train_step(self, train_iter):
        """One optimizer step over gradient_accumulation_steps micro-batches. Returns (loss sum,
        labelled tokens) summed over ranks, as tensors, whether a micro-batch was skipped
        (nonfinite: skip), and this rank's (real tokens, attended pairs) for the FLOP count."""
        with self.work.host():
            self.faults.slow_work(self.rank)
            batches = [self.task.train_batch(next(train_iter))
                       for _ in range(self.cfg.gradient_accumulation_steps)]
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        # torch.full, a fill on the device: torch.tensor(x, device="cuda") would copy from
        # pageable host memory, which waits for the device's queue to drain (a sync per step)
        global_tokens = self.all_reduce(torch.full((), float(local_tokens), device=self.device))
        # [loss sum, tokens] of the micro-batches actually trained on (skipped ones excluded)
        totals = torch.zeros(2, device=self.device)
        skipped = False
        for batch in batches:
            with self.work.device():
                loss_sum, tokens = self.forward(batch)
            # DeepSpeed averages gradients over ranks, so scale by world / global tokens: the
            # gradient is then that of (sum of all token losses) / (all tokens of the step).
            loss = loss_sum * (self.world / global_tokens.clamp(min=1))
            if self.cfg.nonfinite == "skip":
                bad = self.all_reduce((~torch.isfinite(loss_sum.detach())).float())
                if bad.item():
                    skipped = True
                    # DeepSpeed needs a backward per micro-step; this one adds exactly zero to
                    # every gradient (d(p * 0)/dp = 0, whatever p and the activations hold).
                    loss = sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad)
                    self.engine.backward(loss, scale_wrt_gas=False)
                    self.engine.step()
                    continue
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()
            totals += torch.stack([loss_sum.detach().float(), tokens.float()])
        self.all_reduce(totals)
        work = (sum(b["real_tokens"] for b in batches), sum(b["attended_pairs"] for b in batches))
        return totals[0], totals[1], skipped, work

    def log_step(self, pending: torch.Tensor, tokens_per_s: float, elapsed: float,
                 rates: dict) -> dict:
        """The logging step's record; under nonfinite: stop, a non-finite one ends the run."""
        p, cfg = self.progress, self.cfg
        loss_sum, tokens = pending.tolist()
        loss = loss_sum / tokens if tokens else float("nan")  # every micro-batch was skipped
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        record = {"step": p.step, "loss": loss,
                  "lr": self.scheduler.get_last_lr()[0] if self.scheduler else cfg.learning_rate,
                  "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, **rates,
                  "real_tokens_seen": sum(p.real_tokens_seen), "elapsed": elapsed}
        p.trained_tokens_seen += int(tokens)  # the window's labelled tokens, all ranks'
        if self.task.name == "sft":  # the assistant tokens: what chat SFT actually learns from
            record["trained_tokens_seen"] = p.trained_tokens_seen
        if cfg.data.mixture is not None:
            record.update({f"real_tokens_seen/{name}": n
                           for name, n in zip(self.source_names(), p.real_tokens_seen)})
        if p.skipped:
            record["skipped_steps"] = len(p.skipped)
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            record["nonfinite"] = True
            if cfg.nonfinite == "stop":
                self.metrics.log_step(record)
                raise NonFiniteError(
                    f"non-finite loss ({loss}) or gradient norm ({grad_norm}) by step {p.step}; "
                    f"the last complete checkpoint is {checkpoint.latest(self.out)}. Lower "
                    f"learning_rate or set nonfinite: skip")
        return self.metrics.log_step(record)

    def forward(self, batch, return_predictions: bool = False):
        t = as_torch(batch, self.device)
        # counted on the host, from the numpy labels: no device sync per micro-batch
        num_labelled = int((batch["labels"] != IGNORE_INDEX).sum())
        return self.engine(input_ids=t["input_ids"], labels=t["labels"],
                           position_ids=t["position_ids"], cu_seqlens=t["cu_seqlens"],
                           max_seqlen=t["max_seqlen"], return_predictions=return_predictions,
                           num_labelled=num_labelled)

    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def run_eval(self) -> dict:
        """eval_loss and the task's metrics; for a mixture also per source (train/run/eval_loop.py)."""
        if self.eval_loaders is None:
            self.eval_loaders = {s.name: self.open_loader(
                self.cfg.data.validation_split, self.cfg.per_device_eval_batch_size,
                shuffle=False, verify=self.cfg.data.verify, path=s.path)  # checked like train
                for s in self.plan.eval_sources}
        self.engine.eval()

        def forward(batch, return_predictions=False):
            self.watchdog.beat()  # an eval is watched per batch: a long one is not a hang
            return self.forward(batch, return_predictions)

        options = dict(max_batches=self.cfg.eval_max_batches or None, world=self.world,
                       all_reduce=self.all_reduce, device=self.device)
        if self.cfg.data.mixture is not None:
            record = eval_metrics_by_source(forward, self.eval_loaders, self.task, **options)
        else:
            record = eval_metrics(forward, *self.eval_loaders.values(), self.task, **options)
        self.engine.train()
        return record

    # -- collectives ----------------------------------------------------------------------------
    def barrier(self):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def agree(self, code: int) -> int:
        """The largest of the ranks' codes (0: all is well): where a barrier would stand, every
        rank learns whether any failed (train/run/checkpoint.py's save, the export)."""
        if not (torch.distributed.is_initialized() and self.world > 1):
            return code
        flag = torch.tensor(float(code), device=self.device)
        return int(self.all_reduce(flag, torch.distributed.ReduceOp.MAX).item())

    def checkpoint_bytes(self) -> int:
        """About what a checkpoint takes on disk, all ranks together (train/run/health.py)."""
        ds = self.plan.ds_config
        half = any(ds.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in self.hf_model.parameters())
        return health.checkpoint_bytes(params, stage, half)

    def all_reduce(self, tensor, op=None):
        if torch.distributed.is_initialized() and self.world > 1:
            torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
        return tensor

    def per_rank(self, value: float) -> list[float]:
        """`value` of every rank, in rank order (one all-gather)."""
        mine = torch.tensor([value], dtype=torch.float64, device=self.device)
        if not (torch.distributed.is_initialized() and self.world > 1):
            return [value]
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(every, mine)
        return [float(t) for t in every]

    def gather_hosts(self) -> list[str]:
        if not (torch.distributed.is_initialized() and self.world > 1):
            return [self.watchdog.host]
        hosts = [None] * self.world
        torch.distributed.all_gather_object(hosts, self.watchdog.host)
        return hosts

    def agree_to_stop(self, local: StopReason | None) -> StopReason | None:
        """All ranks stop together or not at all: the reasons' values are max-reduced. Alone,
        there is nothing to agree on, and no device round trip (a host sync) per step."""
        if not (torch.distributed.is_initialized() and self.world > 1):
            return local
        flag = self.all_reduce(torch.tensor(float(local or 0), device=self.device),
                               torch.distributed.ReduceOp.MAX)
        return StopReason(int(flag.item())) if flag.item() else None

    # -- checkpoints and export ----------------------------------------------------------------
    def save(self, pending: torch.Tensor):
        p = self.progress
        if self.saved_step == p.step:
            return
        self.saved_step = p.step
        self.watchdog.enter("checkpoint save", p.step,
                            probe=lambda: tree_bytes(checkpoint.root(self.out)))
        p.pending_loss, p.pending_tokens = pending.tolist()
        self.count_real_tokens()
        state = {"step": p.step, "real_tokens_seen": p.real_tokens_seen, "world_size": self.world,
                 "loader": self.loader.state_dict(), "config": self.cfg.to_dict(),
                 "skipped_steps": p.skipped, "pending_loss": p.pending_loss,
                 "pending_tokens": p.pending_tokens, "data": self.plan.data_identity,
                 "trained_tokens_seen": p.trained_tokens_seen}
        checkpoint.save(self.engine, self.out, p.step, state, self.rank, self.barrier,
                        keep=self.cfg.save_total_limit,
                        crash_before_commit=self.faults.crash_in_save(p.step),
                        agree=self.agree, needed=self.checkpoint_bytes())

    def load(self, path: Path) -> Progress:
        state = checkpoint.load_state(path)
        if state["world_size"] != self.world:
            load_dir = checkpoint.convert_for_world_size(
                path, self.rank, self.cfg.checkpoint_conversion_timeout_s)
            tag = path.name
        else:
            load_dir, tag = path.parent, path.name
        loaded, _ = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if loaded is None:
            raise DataError(f"DeepSpeed could not load the checkpoint {path}")
        self.loader.load_state_dict(state["loader"])
        if state["world_size"] != self.world or not checkpoint.load_rng(path, self.rank):
            # a new rank layout, or RNG state in the old pickled format (never unpickled):
            # fresh, reproducible streams
            torch.manual_seed(self.cfg.seed + 1000 * state["step"] + self.rank)
        if self.rank == 0:
            print(f"resumed from {path} at step {state['step']} "
                  f"(saved by {state['world_size']} ranks, now {self.world})", file=sys.stderr)
        real = state.get("real_tokens_seen")
        if real is None:  # a checkpoint from before the count was kept: count it once
            chunk, consumed = 1 << 20, self.loader.consumed
            real = sum(self.loader.real_tokens_by_source(a, min(a + chunk, consumed))
                       for a in range(0, consumed, chunk)) if consumed else [0] * len(self.sources)
            real = [int(n) for n in real]
        return Progress(state["step"], real, state.get("skipped_steps", []),
                        state.get("pending_loss", 0.0), state.get("pending_tokens", 0.0),
                        int(state.get("trained_tokens_seen", 0)))

    def downstream_eval(self):
        """eval_harness on the checkpoint just saved, inline (train/run/downstream.py): its
        numbers join metrics.jsonl and the trackers at its step."""
        from train.run import downstream
        from train.run.export import export_final

        section, step = self.cfg.eval_harness, self.progress.step
        if not downstream.due(section, step):
            return
        self.watchdog.enter("downstream eval", step)
        data_dir = Path(self.sources[0].path)

        def export(model_dir):
            export_final(self.engine, self.model, model_dir, data_dir, self.rank, self.barrier,
                         agree=self.agree)

        if self.eval_jobs:
            from train.run import eval_jobs

            model_dir = downstream.model_dir_of(self.out, step)
            model_dir.parent.mkdir(parents=True, exist_ok=True)
            export(model_dir)
            if self.rank == 0:  # the job evaluates it; this one goes on at once
                eval_jobs.submit(self.out, step, section, data_dir)
            return
        record = downstream.evaluate_checkpoint(export, self.out, step, section, data_dir,
                                                self.rank, str(self.device))
        self.barrier()  # the other ranks wait for rank 0's harness here
        if record is not None:
            self.metrics.log(record)

    @functools.cached_property
    def eval_jobs(self) -> bool:
        """Are the downstream evals Slurm jobs of their own (train/run/eval_jobs.py)? Asked for
        and possible: this is a Slurm job with sbatch at hand; inline otherwise (with a note)."""
        from train.run import eval_jobs

        section = self.cfg.eval_harness
        if section.where != "slurm" or not section.tasks:
            return False
        if eval_jobs.under_slurm():
            return True
        if self.rank == 0:
            note("eval_harness.where is slurm but this run is not a Slurm job with sbatch at "
                 "hand (--cluster local, or no Slurm): the evals run inline")
        return False

    def merge_evals(self, ended: bool = False):
        """Rank 0 logs the eval jobs' finished results (train/run/eval_jobs.py) at their steps."""
        if self.rank == 0 and self.eval_jobs:
            from train.run import eval_jobs

            for record in eval_jobs.collect(self.out, ended):
                self.metrics.log(record, late=True)

    def export(self):
        """output_dir/final/: a Hugging Face model directory with the shards' tokenizer."""
        from train.run.export import export_final
        self.watchdog.enter("export", self.progress.step,
                            probe=lambda: tree_bytes(self.out / "final"))
        export_final(self.engine, self.model, self.out / "final", Path(self.sources[0].path),
                     self.rank, self.barrier, config=self.cfg.to_dict(), agree=self.agree)

    def progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.plan.total_steps, initial=self.progress.step, desc="train",
                    unit="step", disable=self.rank != 0, file=sys.stderr, mininterval=1.0)
