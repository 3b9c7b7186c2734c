"""The DeepSpeed engine of a run: the process group, the wired model, the optimizer and the
learning-rate schedule. torch AdamW and a LambdaLR schedule are handed to DeepSpeed (unless the
DeepSpeed JSON names its own), which keeps the FusedAdam JIT build out of the way on CPU.
"""
from __future__ import annotations

import datetime
import math
from pathlib import Path

import torch

from train.run.distributed import DistEnv, forget_rendezvous, rendezvous_store
from train.model import PackedModel, apply_lora, decays, enable_activation_checkpointing


def pick_device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    # One visible GPU per task (submitit and srun --gpus-per-task narrow CUDA_VISIBLE_DEVICES):
    # it is cuda:0. Otherwise each local rank takes its own.
    return torch.device("cuda", 0 if torch.cuda.device_count() == 1 else local_rank)


def device_memory(local_rank: int) -> int | None:
    """The bytes of this rank's GPU, for the memory plan; None on CPU (nothing to check)."""
    device = pick_device(local_rank)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def start_process_group(device: torch.device, env: DistEnv, rendezvous_dir: Path) -> None:
    """The process group, through the rendezvous train/run/distributed.py describes; DeepSpeed then
    adopts it (its init_distributed wraps a group that exists)."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=10)  # DeepSpeed's default for collectives
    store = rendezvous_store(env, rendezvous_dir, timeout)
    if store is not None:
        torch.distributed.init_process_group(backend, store=store, rank=env.rank,
                                             world_size=env.world_size, timeout=timeout)
        env.export()
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    forget_rendezvous(rendezvous_dir, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases and norm weights (train.model.decays)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decays(p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops an empty group (LoRA's adapters are all matrices), and the LR schedule
    # must see the groups it does
    return [g for g in groups if g["params"]]


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if kind == "constant":  # TrainingArguments' meaning: no warmup (constant_with_warmup has it)
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant_with_warmup":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)  # linear
    return f


def build_engine(cfg, hf_model, ds_config: dict, total_steps: int):
    """(DeepSpeed engine, the PackedModel it wraps, the LR scheduler or None). Collective."""
    import deepspeed

    from train.config import warmup_steps

    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(hf_model, cfg.gradient_checkpointing_every_n_layers,
                                        cfg.gradient_checkpointing_kwargs)
    if cfg.peft.method:  # LoRA: the base frozen; param_groups then hands only adapters on
        hf_model = apply_lora(hf_model, cfg.peft)
    model = PackedModel(hf_model, cfg.kernels.attention, cfg.kernels.cross_entropy,
                        cfg.kernels.cross_entropy_grad_weight)
    optimizer = lr_scheduler = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        if "scheduler" not in ds_config:
            lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
                cfg.lr_scheduler_type, warmup_steps(cfg, total_steps), total_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
        model_parameters=None if optimizer else [p for p in model.parameters() if p.requires_grad],
        config=ds_config)
    if (torch.distributed.get_world_size() == 1 and not engine.zero_optimization()
            and not (engine.bfloat16_enabled() or engine.fp16_enabled())):
        # Alone, with fp32 torch gradients, the gradients' all-reduce is an identity that still
        # flattens every gradient into one buffer, reduces it and copies it back, each step
        engine.enable_backward_allreduce = False
    return engine, model, scheduler
