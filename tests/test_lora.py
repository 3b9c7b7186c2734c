"""LoRA through peft (the config's peft section).

In process: the section's bad values are refused naming the key (QLoRA's refusal among them:
the same check runs at config load in every command); the export's merge (W + s B A,
modules_to_save in place) equals peft's own merge_and_unload, for GPT-2's Conv1D layers and a
BERT token classifier; a packed LoRA model's fused loss equals its merge's, and only adapters
and the saved head get gradients; the export's self-check passes an honest export and fails
loudly on a wrong one. Through the real CLI: a target that matches nothing, a token classifier
without its head in modules_to_save and a peft that does not import exit 2 with one line naming
the key, and without a peft section nothing imports peft. A real 2-rank run (torchrun,
DeepSpeed ZeRO-3 on CPU) of configs/tiny-lora.yaml trains, resumes bit for bit (with activation
checkpointing turned on), and exports an adapter (no empty tensors) and a merged model that
pipeline() loads; under ZeRO-2 a run resumes bit for bit on 2 ranks, and on 1 rank (universal
checkpoint) to float rounding. (tests/test_memory_plan.py checks the engine's state: under ZeRO-2
and 3 only the adapters train and have Adam moments, and the bytes equal the plan's.)
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import REPO, broken_import_env, losses, read_metrics, run_cli, run_train
from train.config import load_config
from train.errors import UsageError

LORA = str(REPO / "configs" / "tiny-lora.yaml")
NER = str(REPO / "configs" / "tiny-token-classification.yaml")


@pytest.mark.parametrize("override, key", [
    ("peft.r=0", "peft.r"),
    ("peft.alpha=-1", "peft.alpha"),
    ("peft.dropout=1.0", "peft.dropout"),
    ("peft.method=prefix", "peft.method"),
    ("peft.method=qlora", "peft.method: qlora"),
    ("peft.load_in_4bit=true", "peft.load_in_4bit"),
    ("peft.target_modules=[]", "peft.target_modules"),
])
def test_bad_peft_values_are_refused_naming_the_key(override, key):
    with pytest.raises(UsageError, match=key.replace(".", r"\.")) as err:
        load_config(LORA, [override])
    assert "\n" not in str(err.value)


def test_qlora_says_what_it_needs():
    with pytest.raises(UsageError, match="needs a GPU and bitsandbytes"):
        load_config(LORA, ["peft.method=qlora"])


def test_preflight_refuses_a_target_that_is_no_layer(prepared, tmp_path):
    from train.run.preflight import preflight

    cfg = load_config(LORA, [f"data.path={prepared}", f"output_dir={tmp_path / 'r'}",
                             "peft.target_modules=[c_fc, attn]"])  # attn: GPT2Attention
    with pytest.raises(UsageError, match=r"peft.target_modules \['attn', 'c_fc'\]: a module "
                                         r"they name is no layer peft adapts .* c_attn, c_fc"):
        preflight(cfg, 2)


def tiny_peft(kind: str, section_overrides: dict):
    import transformers

    from train.config import PeftSection
    from train.model import apply_lora

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=2,
                                         n_positions=32, bos_token_id=0, eos_token_id=0,
                                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=32,
                                         num_labels=5, max_position_embeddings=32,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.BertForTokenClassification(config)
    section = PeftSection(method="lora", r=4, alpha=8, **section_overrides)
    peft_model = apply_lora(model, section)
    with torch.no_grad():  # B starts at zero (the update is 0): give every adapter a value
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return peft_model.eval()


CASES = {"gpt2": {}, "bert-ner": {"modules_to_save": ["classifier"]}}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_export_merge_equals_peft_merge_and_unload(kind):
    import copy

    from train.run.export import lora_state_dicts

    peft_model = tiny_peft(kind.split("-")[0], CASES[kind])
    merged, base = lora_state_dicts(peft_model, peft_model.state_dict())
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert sorted(merged) == sorted(reference)
    for key, value in reference.items():
        # one fp32 product B A added to W either way: the same operations, bit for bit
        torch.testing.assert_close(merged[key], value, atol=1e-7, rtol=0, msg=key)
    assert sorted(base) == sorted(reference)
    if kind == "bert-ner":  # the base keeps the original (frozen) classifier
        original = peft_model.get_base_model().classifier.original_module.weight
        assert torch.equal(base["classifier.weight"], original)
        assert not torch.equal(merged["classifier.weight"], original)


def test_export_self_check_passes_an_honest_export_and_refuses_a_wrong_one(tmp_path):
    from train.run.export import (ADAPTER_DIR, ExportCheckError, check_lora_export,
                                  reference_logits, save_lora)

    peft_model = tiny_peft("gpt2", {})
    reference = reference_logits(peft_model.get_base_model())
    save_lora(peft_model, None, tmp_path, tmp_path)
    assert (tmp_path / ADAPTER_DIR / "base" / "model.safetensors").is_file()
    check_lora_export(tmp_path, reference)
    with pytest.raises(ExportCheckError, match="merged model .* gives other logits"):
        check_lora_export(tmp_path, (reference[0] + 1e-3, reference[1]))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_packed_lora_model_trains_the_adapters_alone_and_equals_its_merge(kind):
    """PackedModel over a PeftModel: the fused loss of a packed batch equals that of the same
    model merged (so the head peft runs, modules_to_save's trained copy, is the one wired), and
    the backward reaches the adapters and the saved head only."""
    import copy

    from helpers import ATOL, NUM_LABELS, RTOL, packed_encoder_batch
    from train.model import PackedModel

    peft_model = tiny_peft(kind.split("-")[0], CASES[kind]).train()
    merged = copy.deepcopy(peft_model).merge_and_unload()
    batch, _, _ = packed_encoder_batch([[5, 3, 8], [2, 14]], NUM_LABELS if kind == "bert-ner"
                                       else 61, labelled=0.9)
    batch["input_ids"] = 2 + batch["input_ids"] % 59  # within the tiny models' 61 ids
    wired = PackedModel(peft_model, "torch", "torch")
    loss, count = wired(**batch)
    with torch.no_grad():
        expected, expected_count = PackedModel(merged, "torch", "torch")(**batch)
    assert count == expected_count
    torch.testing.assert_close(loss.detach(), expected, atol=ATOL, rtol=RTOL)
    loss.backward()
    trained = {n for n, p in wired.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in wired.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or ".modules_to_save." in n for n in trained), trained
    with wired.unwrapped_for_export() as exported:  # plain heads for the export, then back
        assert all(type(m) is torch.nn.Linear for m in wired._head_linears())
        assert exported is peft_model
    assert all(type(m).__name__ == "FusedLossLinear" for m in wired._head_linears())


# --- the real command line ------------------------------------------------------------------

def refused(res, key: str):
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert key in line, line
    return line


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_cli_refuses_a_target_that_matches_nothing(prepared, tmp_path):
    res = run_cli("-m", "train", LORA, f"data.path={prepared}", f"output_dir={tmp_path / 'r'}",
                  "peft.target_modules=[c_attn, q_proj]")
    line = refused(res, "peft.target_modules: 'q_proj' matches no module of GPT2LMHeadModel")
    assert "c_attn" in line  # the modules there are
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_cli_refuses_lora_on_a_token_classifier_without_its_head(ner_data, tmp_path):
    res = run_cli("-m", "train", NER, f"data.path={ner_data}", f"output_dir={tmp_path / 'r'}",
                  "peft.method=lora")
    refused(res, "peft.modules_to_save must name the task's head 'classifier'")


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_cli_refuses_a_peft_that_does_not_import(prepared, tmp_path):
    res = run_cli("-m", "launcher", "--dry-run", LORA, f"data.path={prepared}",
                  f"output_dir={tmp_path / 'r'}", env=broken_import_env(tmp_path, "peft"))
    refused(res, "peft.method is set but the peft library does not import")
    # without a peft section nothing imports it: the core runs without peft installed
    res = run_cli("-c", "import train.run.trainer, train.run.export, train.evaluate, "
                  "train.generate, launcher.__main__", env=broken_import_env(tmp_path, "peft"))
    assert res.returncode == 0, res.stderr[-2000:]


# --- a real run: 2 ranks, ZeRO-3 on CPU --------------------------------------------------------

def lora_run(data, out, *extra, nproc=2):
    res = run_train(LORA, f"data.path={data}", f"output_dir={out}", "max_steps=6",
                    "logging_steps=1", "save_steps=3", "eval_strategy=no",
                    "per_device_train_batch_size=4", "data.seq_len=64", "learning_rate=1e-2",
                    "deepspeed.zero_stage=3", *extra, nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    return losses(out)


def rewind(out, step: int, aside) -> None:
    """OUT as a run stopped after its step-STEP checkpoint: later checkpoints moved to ASIDE,
    the final export removed, metrics.jsonl cut after STEP."""
    aside.mkdir()
    for later in (out / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            later.rename(aside / later.name)
    shutil.rmtree(out / "final", ignore_errors=True)
    (out / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                          .splitlines()) if r.get("step", 0) <= step))


def losses_and_grad_norms(out) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(out) if "loss" in r}


@pytest.mark.slow
def test_two_rank_zero3_lora_trains_resumes_exactly_and_exports_both(prepared, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, pipeline

    out = tmp_path / "run"
    whole = lora_run(prepared, out)
    assert sorted(whole) == list(range(1, 7))
    assert whole[6] < whole[1] - 0.1, whole  # the adapters alone learn
    # resume from step 3 (the step-6 checkpoint set aside), now with activation checkpointing
    # (the same math, non-reentrant, over a frozen base): steps 4-6 as the uninterrupted run
    rewind(out, 3, tmp_path / "aside")
    resumed = lora_run(prepared, out, "resume=auto", "gradient_checkpointing=true")
    assert resumed == whole  # floats from JSON: bit for bit

    # the adapter: every tensor whole (ZeRO-3 gathered), B trained away from its zero init
    adapter = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    assert adapter and min(t.numel() for t in adapter.values()) > 0
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    config = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base" and config["r"] == 8
    # loaded by peft's own API and by transformers' pipeline; the same next-token logits
    base = AutoModelForCausalLM.from_pretrained(out / "final" / "adapter" / "base")
    with_adapter = PeftModel.from_pretrained(base, out / "final" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.arange(2, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).logits,
                                   merged(input_ids=ids).logits, atol=1e-5, rtol=0)
    generator = pipeline("text-generation", model=str(out / "final"))
    assert generator("def ", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    # train.evaluate and train.generate take either directory, with the same result
    from train.evaluate import evaluate_export
    from train.generate import load

    evals = [evaluate_export(str(d), str(prepared), max_batches=2)
             for d in (out / "final", out / "final" / "adapter")]
    assert evals[0]["eval_tokens"] > 0
    assert evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], abs=1e-5)
    model, tokenizer = load(str(out / "final" / "adapter"))
    assert type(model).__name__ == "GPT2LMHeadModel"  # the adapter merged into its base


@pytest.mark.slow
def test_zero2_lora_resumes_exactly_and_under_another_world_size(prepared, tmp_path):
    """configs/tiny-lora.yaml under ZeRO-2 (its own stage), 4 steps on 2 ranks, saved at step 2;
    resumed from that checkpoint on 2 ranks, steps 3-4 equal the uninterrupted run's losses and
    gradient norms bit for bit; a copy resumed on 1 rank with the same global batch (4 x 2 ->
    8 x 1) goes through DeepSpeed's universal checkpoint (frozen base and adapters) and equals it
    to float rounding, as full fine-tuning does (tests/test_train.py): one rank sums the
    gradients in another order. (ZeRO-3 resumes bit for bit in the test above; its 2 -> 1 rank
    resume was checked by hand the same way: docs/memory.md.)"""
    out, moved = tmp_path / "run", tmp_path / "moved"
    stage2 = ["deepspeed.zero_stage=2", "max_steps=4", "save_steps=2"]
    lora_run(prepared, out, *stage2)
    whole = losses_and_grad_norms(out)
    assert sorted(whole) == [1, 2, 3, 4] and all(norm > 0 for _, norm in whole.values())
    rewind(out, 2, tmp_path / "aside")
    shutil.copytree(out, moved)
    lora_run(prepared, out, *stage2, "resume=auto")
    assert losses_and_grad_norms(out) == whole  # floats from JSON: bit for bit
    res = run_train(LORA, f"data.path={prepared}", f"output_dir={moved}", "logging_steps=1",
                    "eval_strategy=no", "data.seq_len=64", "learning_rate=1e-2", *stage2,
                    "per_device_train_batch_size=8", "resume=auto", nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "saved by 2 ranks, now 1" in res.stderr
    one_rank = losses_and_grad_norms(moved)
    assert sorted(one_rank) == [1, 2, 3, 4]
    # fp32 sums of the same terms in another order: measured 8e-8 relative on the loss and
    # 1.3e-7 on the norm; 1e-5 is ~100x that, and 4 orders of magnitude below what one step
    # changes the loss by here (0.07-0.26)
    for step in (3, 4):
        assert one_rank[step] == pytest.approx(whole[step], rel=1e-5, abs=0), step
    assert (moved / "final" / "adapter" / "adapter_model.safetensors").exists()
