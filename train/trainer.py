"""One rank of a run: model, packed data, DeepSpeed engine, the loop, eval, checkpoints, export.

Read top to bottom in the order things happen in `run`:
  1. where this rank is (environment), what the data is (index, checks), what the model is;
  2. the DeepSpeed config, the process group, the engine (torch AdamW and a LambdaLR schedule
     handed to DeepSpeed, which keeps the FusedAdam JIT build out of the way on CPU);
  3. resume from the latest complete checkpoint (also under another world size);
  4. the steps: accumulation micro-batches, the loss as a true token average over ranks and
     micro-batches, clipping, metrics, eval, checkpoints;
  5. the final checkpoint and the export of output_dir/final/.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from train import checkpoint, distributed
from train.config import Config, deepspeed_config, warmup_steps
from train.errors import DataError, UsageError
from train.loader import IGNORE_INDEX, PackedLoader, as_torch
from train.preemption import StopRequest
from train.model import PackedModel, position_offset
from train.tasks import eval_record, make_task
from train.shards import ShardIndex, file_sha256


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm under nonfinite: stop."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def build_hf_model(cfg: Config, index: ShardIndex, task):
    """A local Hugging Face model to fine-tune, or a new one from model.config, with the head
    of the task (a token classifier gets the data's label set)."""
    import transformers
    from transformers import AutoConfig

    auto_model = getattr(transformers, task.auto_class)

    if cfg.model.name_or_path:
        name = cfg.model.name_or_path
        path = Path(name)
        if not path.exists() and name.startswith(("/", ".", "~")):  # a local path, not a hub name
            raise UsageError(f"model.name_or_path {name} does not exist")
        try:  # a hub name (org/model or gpt2) needs a network; say so rather than trace back
            # a new label set replaces a classifier head of another size
            extra = {"ignore_mismatched_sizes": True} if task.model_kwargs() else {}
            model = auto_model.from_pretrained(name, dtype=torch.float32, **task.model_kwargs(),
                                               **extra)
        except OSError as err:
            raise UsageError(f"model.name_or_path {name}: not a local model directory, and "
                             f"loading it by name failed ({str(err).splitlines()[0]})") from None
        tokenizer_json = path / "tokenizer.json"
        index.check_vocab(model.config.vocab_size,
                          file_sha256(tokenizer_json) if tokenizer_json.exists() else None)
        return model
    spec = dict(cfg.model.config)
    model_type = spec.pop("model_type")
    spec.setdefault("vocab_size", index.vocab_size)
    for key in ("bos_token_id", "eos_token_id"):
        spec.setdefault(key, index.eos_id)
    special = index.special_ids
    if "pad_token" in special:  # BERT-style embeddings reserve the pad row
        spec.setdefault("pad_token_id", special["pad_token"])
    try:
        hf_config = AutoConfig.for_model(model_type, **spec, **task.model_kwargs())
    except (ValueError, KeyError) as err:
        raise UsageError(f"model.config: {err}") from None
    index.check_vocab(hf_config.vocab_size)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
    return auto_model.from_config(hf_config, dtype=torch.float32)


def max_positions(hf_model) -> int | None:
    """How many positions the model's position table holds (RoBERTa's first ones are reserved)."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(hf_model.config, attr, None)
        if isinstance(value, int):
            return value - position_offset(hf_model)
    return None


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases and norm weights (the Trainer's rule: 1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)  # linear
    return f


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

class Run:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.env = distributed.from_environment()
        self.env.export()
        self.rank, self.world = self.env.rank, self.env.world_size
        self.out = Path(cfg.output_dir)
        self.device = self.pick_device()

        # Everything that can be wrong with the inputs is found before the process group exists.
        self.index = ShardIndex.load(cfg.data.path)
        self.task = make_task(cfg, self.index)
        self.hf_model = build_hf_model(cfg, self.index, self.task)
        self.max_pos = max_positions(self.hf_model)
        if self.max_pos and cfg.data.seq_len > self.max_pos:
            raise UsageError(f"data.seq_len {cfg.data.seq_len} exceeds the model's "
                             f"{self.max_pos} positions; lower data.seq_len")
        self.loader = PackedLoader(cfg.data.path, "train", seq_len=cfg.data.seq_len,
                                   micro_batch_size=cfg.per_device_train_batch_size,
                                   rank=self.rank, world_size=self.world, seed=cfg.seed,
                                   max_positions=self.max_pos, verify=cfg.data.verify,
                                   **self.task.loader_options)
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.world
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.num_train_epochs * self.loader.num_samples / per_step))
        hidden = getattr(self.hf_model.config, "hidden_size", None) or getattr(self.hf_model.config, "n_embd", 768)
        self.ds_config = deepspeed_config(cfg, self.world, hidden, self.total_steps)
        self.has_val = cfg.eval_strategy != "no" and cfg.data.validation_split in self.index.splits
        self.eval_loader = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if not os.access(self.out, os.W_OK):
                raise UsageError(f"output_dir {self.out} is not writable")

    def pick_device(self) -> torch.device:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # One visible GPU per task (submitit and srun --gpus-per-task narrow CUDA_VISIBLE_DEVICES):
        # it is cuda:0. Otherwise each local rank takes its own.
        return torch.device("cuda", 0 if torch.cuda.device_count() == 1 else self.env.local_rank)

    # -- set-up that needs the process group -----------------------------------------------------
    def start(self):
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   verbose=False)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model = PackedModel(self.hf_model, self.cfg.kernels.attention,
                                    self.cfg.kernels.cross_entropy)
        optimizer = lr_scheduler = None
        if "optimizer" not in self.ds_config:
            optimizer = torch.optim.AdamW(param_groups(self.model, self.cfg.weight_decay),
                                          lr=self.cfg.learning_rate,
                                          betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                          eps=self.cfg.adam_epsilon)
            if "scheduler" not in self.ds_config:
                lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
                    self.cfg.lr_scheduler_type, warmup_steps(self.cfg, self.total_steps),
                    self.total_steps))
        self.resume_from = self.find_resume()
        if self.resume_from is not None and checkpoint.saved_world_size(self.resume_from) != self.world:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=lr_scheduler,
            model_parameters=None if optimizer else self.model.parameters(), config=self.ds_config)

    def barrier(self):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce(self, tensor, op=None):
        if torch.distributed.is_initialized() and self.world > 1:
            torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
        return tensor

    def find_resume(self) -> Path | None:
        choice = self.cfg.resume
        if choice == "never":
            return None
        if choice == "auto":
            return checkpoint.latest(self.out)
        path = Path(choice)
        if not (path / checkpoint.STATE).is_file():
            raise UsageError(f"resume: {choice} is not a complete checkpoint directory "
                             f"(no {checkpoint.STATE}); use resume: auto or a step-N directory")
        return path

    def load(self, path: Path) -> dict:
        state = checkpoint.load_state(path)
        if state["world_size"] != self.world:
            if self.rank == 0:
                checkpoint.to_universal(path)
            self.barrier()
            load_dir, tag = path / "universal", path.name
        else:
            load_dir, tag = path.parent, path.name
        loaded, _ = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if loaded is None:
            raise DataError(f"DeepSpeed could not load the checkpoint {path}")
        self.loader.load_state_dict(state["loader"])
        rng = path / f"rng-rank{self.rank}.pt"
        if rng.exists() and state["world_size"] == self.world:
            checkpoint.set_rng_state(torch.load(rng, weights_only=False))
        else:  # a new rank layout: fresh, reproducible streams
            torch.manual_seed(self.cfg.seed + 1000 * state["step"] + self.rank)
        return state

    # -- the loop -------------------------------------------------------------------------------
    def micro_batches(self):
        return [self.task.train_batch(next(self.train_iter))
                for _ in range(self.cfg.gradient_accumulation_steps)]

    def forward(self, batch, return_predictions: bool = False):
        t = as_torch(batch, self.device)
        return self.engine(input_ids=t["input_ids"], labels=t["labels"],
                           position_ids=t["position_ids"], cu_seqlens=t["cu_seqlens"],
                           max_seqlen=t["max_seqlen"], return_predictions=return_predictions)

    def train_step(self):
        """One optimizer step. Returns (loss sum, tokens) summed over ranks, as tensors."""
        batches = self.micro_batches()
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        global_tokens = self.all_reduce(torch.tensor(float(local_tokens), device=self.device))
        # [loss sum, tokens] of the micro-batches actually trained on (skipped ones excluded)
        totals = torch.zeros(2, device=self.device)
        for batch in batches:
            loss_sum, tokens = self.forward(batch)
            # DeepSpeed averages gradients over ranks, so scale by world / global tokens: the
            # gradient is then that of (sum of all token losses) / (all tokens of the step).
            loss = loss_sum * (self.world / global_tokens.clamp(min=1))
            if self.cfg.nonfinite == "skip":
                bad = self.all_reduce((~torch.isfinite(loss_sum.detach())).float())
                if bad.item():
                    if not self.skipped or self.skipped[-1] != self.step + 1:
                        self.skipped.append(self.step + 1)
                    # DeepSpeed needs a backward per micro-step; this one adds exactly zero to
                    # every gradient (d(p * 0)/dp = 0, whatever p and the activations hold).
                    zero = sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad)
                    self.engine.backward(zero, scale_wrt_gas=False)
                    self.engine.step()
                    continue
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()
            totals += torch.stack([loss_sum.detach().float(), tokens.float()])
        self.all_reduce(totals)
        return totals[0], totals[1]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval_loss and perplexity = exp(token-averaged loss) over the validation split (token
        classification: seqeval's entity precision, recall, F1 and token accuracy instead of
        perplexity). Every rank runs the same number of forwards (ZeRO-3 gathers parameters
        collectively): a rank with fewer batches repeats its last one with every label ignored."""
        from train.ner_metrics import EntityCounter

        self.engine.eval()
        if self.eval_loader is None:  # opened once: it scans the split's EOSes
            self.eval_loader = PackedLoader(
                self.cfg.data.path, self.cfg.data.validation_split, seq_len=self.cfg.data.seq_len,
                micro_batch_size=self.cfg.per_device_eval_batch_size, rank=self.rank,
                world_size=self.world, shuffle=False, max_positions=self.max_pos, verify="none",
                **self.task.loader_options)
        loader = self.eval_loader
        per_rank = math.ceil(math.ceil(loader.num_samples / self.world) / loader.micro_batch_size)
        if self.cfg.eval_max_batches:
            per_rank = min(per_rank, self.cfg.eval_max_batches)
        # only the batches this eval uses are built (and masked)
        mine = [self.task.eval_batch(b) for b in itertools.islice(loader.one_pass(), per_rank)]
        entities = EntityCounter() if self.task.reports_entities else None
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for i in range(per_rank):
            if i < len(mine):
                batch = mine[i]
            else:
                batch = dict(mine[-1] if mine else self.task.eval_batch(loader.batch(np.array([0]))))
                batch["labels"] = np.full_like(batch["labels"], IGNORE_INDEX)
            loss_sum, tokens, *predicted = self.forward(batch, return_predictions=entities is not None)
            total += torch.stack([loss_sum.double(), tokens.double()])
            if entities is not None:
                self.task.update_entities(entities, batch, predicted[0].cpu().numpy())
        self.all_reduce(total)
        self.engine.train()
        counts = None
        if entities is not None:
            counts = self.all_reduce(torch.tensor(entities.counts(), device=self.device,
                                                  dtype=torch.float64)).tolist()
        return eval_record(total[0].item(), int(total[1].item()), counts)

    def log(self, record: dict):
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
                "loader": self.loader.state_dict(), "config": self.cfg.to_dict(),
                "skipped_steps": self.skipped,
                # the logging window in progress, so that a stop between two logging steps
                # changes no logged loss
                "pending_loss": self.pending_loss.item(), "pending_tokens": self.pending_tokens.item()}

    def save(self):
        crash = os.environ.get("TRAIN_FAULT_CRASH_IN_SAVE_AT_STEP") == str(self.step)
        checkpoint.save(self.engine, self.out, self.step, self.trainer_state(), self.rank,
                        self.barrier, keep=self.cfg.save_total_limit, crash_before_commit=crash)

    def train(self) -> int:
        cfg = self.cfg
        self.step, self.tokens_seen, self.skipped = 0, 0, []
        self.pending_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self.pending_tokens = torch.zeros((), device=self.device, dtype=torch.float64)
        self.tb = None
        if cfg.report_to == "tensorboard" and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        if self.resume_from is not None:
            state = self.load(self.resume_from)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.skipped = state.get("skipped_steps", [])
            self.pending_loss.fill_(state.get("pending_loss", 0.0))
            self.pending_tokens.fill_(state.get("pending_tokens", 0.0))
            self.trim_metrics(self.step)
            if self.rank == 0:
                print(f"resumed from {self.resume_from} at step {self.step} "
                      f"(saved by {state['world_size']} ranks, now {self.world})", file=sys.stderr)
        elif self.rank == 0 and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()  # a fresh run: no stale records
        self.train_iter = iter(self.loader)
        tokens_per_step = (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                           * self.world * cfg.data.seq_len)
        eval_every = cfg.eval_steps or cfg.logging_steps
        stop = StopRequest(self.rank)
        fail_at = os.environ.get("TRAIN_FAULT_RAISE_AT", "")  # "RANK:STEP", for the tests
        started = time.time()
        window_start, window_steps = time.time(), 0
        if self.has_val and self.step == 0:  # perplexity before training, as the course shows
            self.log({"step": 0, **self.evaluate()})
        progress = self.progress_bar()
        while self.step < self.total_steps:
            loss_sum, tokens = self.train_step()
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_steps += 1
            self.pending_loss += loss_sum
            self.pending_tokens += tokens
            progress.update(1)
            if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                loss = (self.pending_loss / self.pending_tokens).item() if self.pending_tokens \
                    else float("nan")  # every micro-batch of the window was skipped
                grad_norm = self.engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else None
                now = time.time()
                record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]
                          if self.scheduler else cfg.learning_rate,
                          "grad_norm": grad_norm,
                          "tokens_per_s": window_steps * tokens_per_step / max(now - window_start, 1e-9),
                          "tokens_seen": self.tokens_seen, "elapsed": now - started}
                if self.skipped:
                    record["skipped_steps"] = len(self.skipped)
                if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
                    record["nonfinite"] = True
                    if cfg.nonfinite == "stop":
                        self.log(record)
                        raise NonFiniteError(
                            f"non-finite loss ({loss}) or gradient norm ({grad_norm}) by step "
                            f"{self.step}; the last complete checkpoint is "
                            f"{checkpoint.latest(self.out)}. Lower learning_rate or set "
                            f"nonfinite: skip")
                self.log(record)
                progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
                self.pending_loss.zero_(), self.pending_tokens.zero_()
                window_start, window_steps = now, 0
            if self.has_val and self.step % eval_every == 0 and self.step < self.total_steps:
                self.log({"step": self.step, **self.evaluate()})
            if self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self.save()
            if fail_at == f"{self.rank}:{self.step}":
                raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")
            reason = self.agree_to_stop(stop.local_reason(self.step))
            if reason and self.step < self.total_steps:
                self.save()
                progress.close()
                stop.requeue(reason)
                return 0
        progress.close()
        if self.has_val:
            self.log({"step": self.step, **self.evaluate()})
        self.save()
        self.export()
        if self.rank == 0:
            from train.plot import plot_run
            plot_run(self.out)
            self.summary()
        return 0

    def summary(self):
        metric = "eval_f1" if self.task.reports_entities else "perplexity"
        evals = [r for r in map(json.loads, (self.out / "metrics.jsonl").read_text().splitlines())
                 if metric in r]
        line = f"done: {self.step} steps, {self.tokens_seen:,} tokens; model in {self.out / 'final'}"
        if evals:
            line += (f"; eval {metric.removeprefix('eval_')} {evals[0][metric]:.3f} at step "
                     f"{evals[0]['step']} -> {evals[-1][metric]:.3f} at step {evals[-1]['step']}")
        print(line, file=sys.stderr)

    def agree_to_stop(self, local_reason: str | None) -> str | None:
        """All ranks stop together or not at all: the reasons, as codes, are max-reduced."""
        reasons = (None, "exit_after_steps", "walltime", "warning signal")
        code = 0 if local_reason is None else next(
            i for i, r in enumerate(reasons) if r and local_reason.startswith(r))
        flag = self.all_reduce(torch.tensor(float(code), device=self.device),
                               torch.distributed.ReduceOp.MAX)
        return reasons[int(flag.item())]

    def trim_metrics(self, step: int):
        """A resumed run logs the steps after its checkpoint again: drop the first attempt's."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        lines = [line for line in path.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)

    def progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                    disable=self.rank != 0, file=sys.stderr, mininterval=1.0)

    # -- export -----------------------------------------------------------------------------------
    def export(self):
        """output_dir/final/: a Hugging Face model directory with the shards' tokenizer."""
        from train.export import export_final
        export_final(self.engine, self.model, self.out / "final", Path(self.cfg.data.path),
                     self.rank, self.barrier, config=self.cfg.to_dict())


def run(cfg: Config) -> int:
    run = Run(cfg)
    run.start()
    try:
        return run.train()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
