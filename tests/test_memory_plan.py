"""The memory plan (train/run/memory_plan.py): its arithmetic by hand, its model-state terms
against the bytes a real DeepSpeed engine holds, and the launcher's --dry-run printing it and
refusing a run that cannot fit."""
from __future__ import annotations

import json
import os

import pytest

from helpers import REPO, free_port, run_cli
from train.config import load_config
from train.run.memory_plan import ModelShape, activation_bytes, memory_plan, model_state_bytes

SHAPE = ModelShape(trainable=(10, 7), frozen=(), architecture="GPT2LMHeadModel", hidden=4,
                   intermediate=16, layers=3, vocab=11)


def test_model_states_by_hand():
    # 17 elements in 2 tensors, one optimizer group (no 1-D tensor), 4 ranks. Optimizer: two
    # fp32 moments per element a rank updates, and 4 bytes per Adam step counter.
    # ZeRO-0: every tensor whole, a step counter each (2)
    assert model_state_bytes(SHAPE, stage=0, world=4, dtype_bytes=4) == {
        "parameters": 68, "gradients": 68, "master": 0, "optimizer": 136 + 8}
    assert model_state_bytes(SHAPE, stage=0, world=4, dtype_bytes=2) == {
        "parameters": 34, "gradients": 34, "master": 68, "optimizer": 136 + 8}
    # ZeRO 1-2: the group flattened and padded to a multiple of 2 x 4 ranks, 24 elements (the
    # module's weights live in that buffer); a rank's partition 6, one step counter
    assert model_state_bytes(SHAPE, stage=1, world=4, dtype_bytes=2) == {
        "parameters": 48, "gradients": 34, "master": 24, "optimizer": 48 + 4}
    assert model_state_bytes(SHAPE, stage=2, world=4, dtype_bytes=2) == {
        "parameters": 48, "gradients": 12, "master": 24, "optimizer": 48 + 4}
    # ZeRO-3: each tensor split, the last shard padded: 3 + 2 = 5 a rank; both tensors under the
    # persistence threshold, so also whole on every rank (17)
    assert model_state_bytes(SHAPE, stage=3, world=4, dtype_bytes=2) == {
        "parameters": (5 + 17) * 2, "gradients": 10, "master": 20, "optimizer": 40 + 4}
    assert model_state_bytes(SHAPE, stage=3, world=4, dtype_bytes=2,
                             persistence_threshold=7)["parameters"] == (5 + 7) * 2
    # sub-groups of 3 elements: [3] reaches it, [2] ends the group: two step counters
    assert model_state_bytes(SHAPE, stage=3, world=4, dtype_bytes=2,
                             sub_group_size=3)["optimizer"] == 40 + 8
    # the 1-D tensor in its own group (no weight decay): each group padded to 8, 16 + 8
    split = ModelShape(trainable=(10, 7), frozen=(), architecture="GPT2LMHeadModel", hidden=4,
                       intermediate=16, layers=3, vocab=11, vectors=(7,))
    assert split.groups() == [[10], [7]]
    assert model_state_bytes(split, stage=2, world=4, dtype_bytes=2) == {
        "parameters": 48, "gradients": 12, "master": 24, "optimizer": 48 + 8}


def test_activations_by_hand():
    # GPT-2: 18 x hidden + 4 x intermediate values per token and layer = 136 values, 4 bytes
    full = activation_bytes("GPT2LMHeadModel", hidden=4, intermediate=16, layers=3, tokens=5,
                            dtype_bytes=4, every_n_layers=None)
    outside = 5 * 4 * 4 * 4  # 4 x hidden values per token outside the layers
    assert full == outside + 3 * 5 * 4 * 136
    # every layer checkpointed: 3 inputs of 4 values
    every = activation_bytes("GPT2LMHeadModel", hidden=4, intermediate=16, layers=3, tokens=5,
                             dtype_bytes=4, every_n_layers=1)
    assert every == outside + 3 * 5 * 4 * 4
    # every 2nd: layers 0 and 2 keep their input, layer 1 all of it
    assert activation_bytes("GPT2LMHeadModel", hidden=4, intermediate=16, layers=3, tokens=5,
                            dtype_bytes=4, every_n_layers=2) == outside + (2 * 5 * 4 * 4
                                                                           + 5 * 4 * 136)
    # the layer the backward recomputes is its own term
    plan = memory_plan(SHAPE, stage=0, world=1, dtype_bytes=4, tokens=5, every_n_layers=1,
                       ce_chunk_elements=8)
    assert plan.terms["recompute"] == 5 * 4 * 136


def test_plan_names_the_biggest_term_and_its_fix():
    from train.run.memory_plan import verdict

    plan = memory_plan(SHAPE, stage=0, world=1, dtype_bytes=4, tokens=10**6, every_n_layers=None,
                       ce_chunk_elements=8)
    assert plan.biggest() == "activations"
    kind, line = verdict(plan, plan.total // 2)
    assert kind == "error" and "activations" in line and "gradient_checkpointing" in line
    assert verdict(plan, int(plan.total * 1.05))[0] == "warning"
    assert verdict(plan, plan.total * 2) is None


@pytest.mark.slow
def test_model_states_equal_the_live_bytes_of_the_engine():
    """Each rank's live tensor storage after a step (gc, each storage once; what existed before
    the model was built left out) is exactly the plan's model-state terms, for ZeRO 0-3, fp32
    and bf16, LoRA (peft adapters, the base frozen) on and off: parameters + master weights +
    optimizer (Adam's moments and step counters) + under ZeRO-3 the gradients, whose flat
    partition buffer lives from the engine's start to its end (ZeRO 0-2 free theirs at the
    step). DeepSpeed's own buffers are set apart by identity (engine_state_bytes.buffers: the
    gradient norm it logs, ZeRO-3's inf/nan flag and its reduce bucket, 5e8 elements allocated up
    front, which the plan counts among the temporaries), not by subtraction.

    With LoRA, also: the engine trains exactly the parameters peft reports as trainable
    (get_nb_trainable_parameters), and Adam's moments over the ranks cover those and nothing of
    the frozen base."""
    cases = [f"{stage}:{precision}" for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]
    cases += ["2:bf16:lora", "3:fp32:lora", "3:bf16:lora"]
    res = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2",
                  f"--master_port={free_port()}", str(REPO / "tests" / "engine_state_bytes.py"),
                  *cases, env={"DS_ACCELERATOR": "cpu"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(ranks) == 2 and all(len(results) == len(cases) for results in ranks)
    for results in ranks:
        for r in results:
            if r["lora"]:
                assert r["peft_trainable"] == r["plan_trainable"] == r["module_trainable"], r
            plan = r["plan"]
            states = plan["parameters"] + plan["master"] + plan["optimizer"]
            if r["stage"] == 3:
                assert r["gradient_buffer"] == plan["gradients"], r
                states += plan["gradients"]
            assert r["measured"] == states, r
            if r["stage"] == 3:
                assert r["buffers"]["reduce bucket " + ("torch.bfloat16" if r["bf16"]
                                                        else "torch.float32")] > 0, r
    lora = [[r for r in results if r["lora"]] for results in ranks]
    for cases_of_rank0, cases_of_rank1 in zip(*lora):
        # each rank's partition of the adapters (ZeRO 1-3), or all of them (ZeRO-0); DeepSpeed
        # pads the flat partitions to a multiple of the ranks
        moments = cases_of_rank0["moments"] + cases_of_rank1["moments"]
        trainable = cases_of_rank0["peft_trainable"]
        expected = 2 * trainable if cases_of_rank0["stage"] == 0 else trainable
        assert expected <= moments <= expected + 2 * 2 * 2, (cases_of_rank0, cases_of_rank1)


def dry_run(capsys, tmp_path, data, *overrides):
    from launcher.__main__ import main

    code = main(["--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                 str(REPO / "configs" / "llama-1b.yaml"), f"data.path={data}",
                 f"output_dir={tmp_path / 'run'}", *overrides])
    return code, capsys.readouterr()


def test_launcher_dry_run_prints_the_plan_and_refuses_what_cannot_fit(capsys, tmp_path,
                                                                      prepared):
    code, out = dry_run(capsys, tmp_path, prepared, "health.gpu_memory_gb=80")
    assert code == 0, out.err
    assert "# memory plan (per rank):" in out.out and "#   activations" in out.out
    code, out = dry_run(capsys, tmp_path, prepared, "health.gpu_memory_gb=16")
    assert code == 2
    [line] = [ln for ln in out.err.splitlines() if ln.startswith("error:")]
    assert "biggest term is activations" in line and "gradient_checkpointing" in line, line
    # checkpointing brings the same run under 16 GB
    code, out = dry_run(capsys, tmp_path, prepared, "health.gpu_memory_gb=16",
                        "gradient_checkpointing=true")
    assert code == 0, out.err


def fake_partition(tmp_path, monkeypatch, gres: str) -> None:
    """scontrol and sinfo first on PATH, printing a 4-node partition whose nodes hold `gres`
    (the test cluster's nodes have no GPUs, so their GRES type cannot come from it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"scontrol": "echo 'PartitionName=gpu Default=YES TotalNodes=4 MaxNodes=UNLIMITED "
                         "MaxTime=1-00:00:00'",
             "sinfo": f"echo '4 {gres}'"}
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.parametrize("gres,code,seen", [
    ("gpu:h200:8(S:0-1)", 0, "139.8 GiB per GPU, from partition gpu's GPU type h200"),
    ("gpu:t4:8", 2, "of the device's 14.70 GiB; the biggest term is activations"),
    ("gpu:tesla_p100:8", 0, None),  # unknown type: the plan printed, not checked
])
def test_the_launcher_checks_the_plan_against_the_partitions_gpu_type(
        capsys, tmp_path, monkeypatch, prepared, gres, code, seen):
    fake_partition(tmp_path, monkeypatch, gres)
    got, out = dry_run(capsys, tmp_path, prepared)
    assert got == code, out.err
    if seen:
        assert seen in out.err, out.err
    else:
        assert "device memory" not in out.err and "# memory plan (per rank):" in out.out
    # health.gpu_memory_gb overrides the table
    got, out = dry_run(capsys, tmp_path, prepared, "health.gpu_memory_gb=80")
    assert got == 0 and "device memory" not in out.err, out.err


def test_lora_terms_by_hand():
    # LoRA: the frozen base (100 elements) is counted once, in the training dtype, and sharded
    # by ZeRO-3 alone; gradients, master weights and moments exist for the adapters only
    lora = ModelShape(trainable=(10, 7), frozen=(60, 40), architecture="GPT2LMHeadModel",
                      hidden=4, intermediate=16, layers=3, vocab=11)
    assert model_state_bytes(lora, stage=2, world=4, dtype_bytes=2) == {
        "parameters": (24 + 100) * 2, "gradients": 12, "master": 24, "optimizer": 48 + 4}
    # shards (3 + 2 + 15 + 10) x 2, and the tensors of at most 50 elements whole: 10 + 7 + 40
    assert model_state_bytes(lora, stage=3, world=4, dtype_bytes=2, persistence_threshold=50) == {
        "parameters": (30 + 57) * 2, "gradients": 10, "master": 20, "optimizer": 40 + 4}


# Llama-3-8B's shape (config.json of meta-llama/Meta-Llama-3-8B)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def test_llama_8b_lora_config_dry_runs_with_a_plan_of_adapter_states(capsys, tmp_path, prepared):
    """configs/llama-8b-lora.yaml, from a local directory holding only config.json (the plan
    needs no weights): the launcher's --dry-run accepts it on 2 x 8 GPUs of 80 GB, and the plan
    gives gradients, master weights and moments to the adapters alone."""
    from transformers import LlamaConfig

    from launcher.__main__ import main
    from train.run.preflight import preflight

    model_dir = tmp_path / "llama-3-8b"
    LlamaConfig(**LLAMA3_8B).save_pretrained(model_dir)
    config = str(REPO / "configs" / "llama-8b-lora.yaml")
    overrides = [f"model.name_or_path={model_dir}", f"data.path={prepared}",
                 f"output_dir={tmp_path / 'run'}", "health.gpu_memory_gb=80"]
    code = main(["--nodes", "2", "--gpus-per-node", "8", "--dry-run", config, *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "# memory plan (per rank):" in out.out
    lora = preflight(load_config(config, overrides), 16).memory.terms
    full = preflight(load_config(config, [*overrides, "peft.method=null"]), 16).memory.terms
    # r 16 on the 7 projections of 32 layers: r x (in + out) each, 41,943,040 in all
    adapters = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert adapters == 41_943_040
    assert lora["optimizer"] == pytest.approx(8 * adapters / 16, rel=1e-3)  # two fp32 moments
    assert lora["master"] == pytest.approx(4 * adapters / 16, rel=1e-3)
    assert lora["gradients"] == pytest.approx(2 * adapters / 16, rel=1e-3)  # bf16
    base = 8_030_261_248  # Llama-3-8B's parameters
    assert full["optimizer"] == pytest.approx(8 * base / 16, rel=1e-3)
    # ZeRO-3 also keeps every tensor of at most 1e5 elements (DeepSpeed's default
    # stage3_param_persistence_threshold) whole on each rank: per layer the 2 norms (4,096), the
    # A matrices (16 x 4,096) of q, k, v, o, gate and up, the B matrices of q, o, down (4,096 x 16)
    # and of k, v (1,024 x 16); gate's and up's B and down's A (14,336 x 16) are over it
    whole = 32 * (2 * 4096 + 6 * 16 * 4096 + 3 * 4096 * 16 + 2 * 1024 * 16) + 4096  # final norm
    assert lora["parameters"] == pytest.approx(2 * (base + adapters) / 16 + 2 * whole, rel=1e-3)
