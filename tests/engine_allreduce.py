"""Run under torchrun (DS_ACCELERATOR=cpu): for each `STAGE:PRECISION` given, build the DeepSpeed
engine of a tiny GPT-2 with train.run.engine.build_engine, train it 3 steps, and again from the
same seed with DeepSpeed's gradient all-reduce forced on. Prints, as JSON on rank 0, per case:
whether build_engine left the all-reduce on, and whether the two runs' parameters are bitwise
equal (and that training moved them). Used by tests/test_engine.py: alone, in fp32 without ZeRO, build_engine switches the
all-reduce off (an identity that flattens and copies every gradient), and that must change no
bit of training."""
from __future__ import annotations

import json
import sys

import torch


def train(stage: int, bf16: bool, force_allreduce: bool) -> tuple[bool, list[torch.Tensor], bool]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from train.config import Config, deepspeed_config
    from train.run.engine import build_engine

    cfg = Config(bf16=bf16, learning_rate=1e-2)
    cfg.deepspeed.zero_stage = stage
    config = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    world = torch.distributed.get_world_size()
    engine, _, _ = build_engine(cfg, GPT2LMHeadModel(config), deepspeed_config(cfg, world, 32, 10),
                                10)
    initial = [p.detach().clone() for p in engine.module.parameters()]
    left_on = engine.enable_backward_allreduce
    if force_allreduce:
        engine.enable_backward_allreduce = True
    data = torch.Generator().manual_seed(1 + torch.distributed.get_rank())
    for _ in range(3):
        ids = torch.randint(0, 101, (1, 16), generator=data)
        batch = dict(input_ids=ids, labels=ids, position_ids=torch.arange(16)[None],
                     cu_seqlens=torch.tensor([0, 16], dtype=torch.int32), max_seqlen=16)
        loss_sum, count = engine(**batch)
        engine.backward(loss_sum / count)
        engine.step()
    params = [p.detach().clone() for p in engine.module.parameters()]
    engine.destroy()
    return left_on, params, any(not torch.equal(a, b) for a, b in zip(initial, params))


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    from train.run.distributed import from_environment
    from train.run.engine import start_process_group
    from train.run.trainer import end_process_group

    env = from_environment()
    start_process_group(torch.device("cpu"), env, Path(tempfile.mkdtemp()))
    out = []
    for arg in sys.argv[1:]:
        stage, precision = arg.split(":")
        left_on, params, trained = train(int(stage), precision == "bf16", force_allreduce=False)
        _, reference, _ = train(int(stage), precision == "bf16", force_allreduce=True)
        out.append({"case": arg, "world": env.world_size, "allreduce": left_on, "trained": trained,
                    "bitwise_equal": all(torch.equal(a, b) for a, b in zip(params, reference))})
    if env.rank == 0:
        print(json.dumps(out), flush=True)
    end_process_group()
