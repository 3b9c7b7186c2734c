"""Run under torchrun (DS_ACCELERATOR=cpu): build the DeepSpeed engine of a tiny GPT-2 for each
ZeRO stage and precision given (`STAGE:PRECISION` or `STAGE:PRECISION:lora`, LoRA adapters through
peft on its attention and MLP), take one step, and print, as JSON on rank 0, every rank's bytes
of live tensor storage that the model and its engine added (everything gc can reach, each storage
once), split by identity into DeepSpeed's own buffers (`buffers`: not model states) and the rest,
beside the memory plan's model-state terms; with LoRA also the trainable parameter count peft
reports, the count the engine's module trains and the elements of Adam's first moments this rank
holds. Used by tests/test_memory_plan.py."""
from __future__ import annotations

import gc
import json
import sys

import torch


def live_storages() -> dict[int, torch.UntypedStorage]:
    """Every CPU tensor storage gc can reach (a ZeRO-3 parameter's shard too), by address."""
    found = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu":
            for t in (obj, getattr(obj, "ds_tensor", None)):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    found[t.untyped_storage().data_ptr()] = t.untyped_storage()
    return found


def buffers(optimizer) -> dict[str, torch.Tensor]:
    """DeepSpeed's ZeRO optimizer's tensors that are not model states, by name: the global
    gradient norm it keeps for logging, ZeRO-3's inf/nan flag and its reduce buckets (one per
    communication dtype, reduce_bucket_size elements each, allocated up front)."""
    found = {}
    for name in ("_global_grad_norm", "inf_or_nan_tracker"):
        if torch.is_tensor(getattr(optimizer, name, None)):
            found[name] = getattr(optimizer, name)
    for dtype, bucket in getattr(optimizer, "ipg_buckets", {}).items():
        if torch.is_tensor(getattr(bucket, "buffer", None)):
            found[f"reduce bucket {dtype}"] = bucket.buffer
    return found


def measure(stage: int, bf16: bool, lora: bool = False) -> dict:
    import deepspeed
    from transformers import GPT2Config, GPT2LMHeadModel

    from train.config import Config
    from train.run.engine import build_engine
    from train.run.memory_plan import ModelShape, model_state_bytes

    # the storages alive before the model exists (kept referenced, so that no address of theirs
    # is reused): what earlier cases left behind, not this one's
    gc.collect()
    before = live_storages()
    cfg = Config(bf16=bf16, learning_rate=1e-3)
    cfg.deepspeed.zero_stage = stage
    if lora:
        cfg.peft.method, cfg.peft.r, cfg.peft.target_modules = "lora", 4, ["c_attn", "c_fc"]
    config = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        attn_pdrop=0.0)
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(config)
    from train.model import parameter_numels

    trainable, frozen, sizes = parameter_numels(config, "AutoModelForCausalLM", cfg.peft)
    world = torch.distributed.get_world_size()
    from train.config import deepspeed_config
    ds = deepspeed_config(cfg, world, 32, 10)
    engine, _, _ = build_engine(cfg, hf_model, ds, 10)
    ids = torch.randint(0, 101, (1, 16))
    batch = dict(input_ids=ids, labels=ids, position_ids=torch.arange(16)[None],
                 cu_seqlens=torch.tensor([0, 16], dtype=torch.int32), max_seqlen=16)
    loss_sum, count = engine(**batch)
    engine.backward(loss_sum / count)
    engine.step()
    del loss_sum, count, batch, ids
    gc.collect()
    after = {ptr: st.nbytes() for ptr, st in live_storages().items() if ptr not in before}
    named = {name: t.untyped_storage().data_ptr() for name, t in buffers(engine.optimizer).items()}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    grad_buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)  # ZeRO-3's
    plan = model_state_bytes(ModelShape(tuple(trainable), tuple(frozen), "GPT2LMHeadModel", 32,
                                        128, 2, 101, vectors=sizes["vectors"]),
                             stage=stage, world=world, dtype_bytes=2 if bf16 else 4)
    result = {"stage": stage, "bf16": bf16, "lora": lora, "plan": plan,
              "measured": sum(n for ptr, n in after.items() if ptr not in named.values()),
              "buffers": {name: after.get(ptr, 0) for name, ptr in named.items()},
              "gradient_buffer": 0 if grad_buffer is None
              else after[grad_buffer.untyped_storage().data_ptr()],
              "step_counters": sum(s["step"].untyped_storage().nbytes()
                                   for s in inner.state.values() if torch.is_tensor(s.get("step")))}
    if lora:
        module = engine.module.hf_model
        result.update(
            peft_trainable=module.get_nb_trainable_parameters()[0],
            plan_trainable=sum(trainable),
            module_trainable=sum(getattr(p, "ds_numel", p.numel())
                                 for p in module.parameters() if p.requires_grad),
            moments=sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s))
    engine.destroy()
    del engine, inner, grad_buffer, before
    gc.collect()
    deepspeed.comm.barrier()
    return result


if __name__ == "__main__":
    from train.run.distributed import from_environment
    from train.run.engine import start_process_group
    from train.run.trainer import end_process_group
    from pathlib import Path
    import tempfile

    env = from_environment()
    start_process_group(torch.device("cpu"), env, Path(tempfile.mkdtemp()))
    out = []
    for arg in sys.argv[1:]:
        stage, precision, *lora = arg.split(":")
        out.append(measure(int(stage), precision == "bf16", lora == ["lora"]))
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, out)
    if env.rank == 0:
        print(json.dumps(gathered), flush=True)
    # as the trainer does: a process group left to the interpreter's exit may abort a rank
    # ("terminate called without an active exception") while gloo's threads are still joinable
    end_process_group()
