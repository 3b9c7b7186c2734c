"""task: mlm end to end: 2 ranks under ZeRO-2 and ZeRO-3, the loss falls, the run's eval loss is
reproduced from the export with the same fixed masking, and fill-mask loads the export."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import REPO, read_metrics, run_cli, run_train

CONFIG = str(REPO / "configs" / "tiny-mlm.yaml")


def exported_eval_loss(final, data, seq_len: int, seed: int) -> float:
    """The validation loss recomputed from the export with transformers' own forward, one
    document (attention segment) at a time, under the task's fixed eval masking."""
    from transformers import AutoModelForMaskedLM

    from train.config import Config
    from train.tasks import MaskedLM

    model = AutoModelForMaskedLM.from_pretrained(final).eval()
    loader = PackedLoader(data, "validation", seq_len=seq_len, micro_batch_size=4, shuffle=False,
                          max_positions=model.config.max_position_embeddings)
    cfg = Config(task="mlm", seed=seed)
    cfg.data.whole_word_masking = True
    task = MaskedLM(cfg, loader.index)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in map(task.eval_batch, loader.one_pass()):
            ids, labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
            # a window may start inside a document, whose positions then continue
            positions = batch["position_ids"].reshape(-1)
            cu = batch["cu_seqlens"]
            for a, b in zip(cu[:-1], cu[1:]):
                if (labels[a:b] == -100).all():
                    continue
                logits = model(input_ids=torch.from_numpy(ids[a:b])[None],
                               position_ids=torch.from_numpy(positions[a:b])[None]).logits[0]
                total += torch.nn.functional.cross_entropy(
                    logits, torch.from_numpy(labels[a:b]), ignore_index=-100, reduction="sum").item()
                count += int((labels[a:b] != -100).sum())
    return total / count


from train.data.loader import PackedLoader  # noqa: E402  (used by the helper above)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_masked_lm(mlm_corpus, tmp_path, stage):
    out = tmp_path / "run"
    res = run_train(CONFIG, f"data.path={mlm_corpus}", f"output_dir={out}",
                    "max_steps=40", "logging_steps=5", "eval_steps=20", "save_steps=20",
                    "per_device_train_batch_size=8", "data.seq_len=64", "eval_max_batches=null",
                    f"deepspeed.zero_stage={stage}")
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    # from ~6 nats (uniform over 400 ids) the tiny BERT learns the corpus' unigram statistics
    # and more: well over a nat in 40 steps
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, train
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0, evals
    # the export, run by transformers itself on each document under the same fixed masking,
    # gives the run's final eval loss: the masking is deterministic and the export is faithful
    again = exported_eval_loss(out / "final", mlm_corpus, seq_len=64, seed=42)
    assert abs(again - evals[-1]["eval_loss"]) < 1e-4, (again, evals[-1])

    # train.evaluate on the export reproduces it too (the same code path as the run's eval)
    res = run_cli("-m", "train.evaluate", "--model", str(out / "final"), "--data", str(mlm_corpus),
                  "--seq-len", "64")  # the masking settings come from the export
    assert res.returncode == 0, res.stderr
    assert abs(json.loads(res.stdout)["eval_loss"] - evals[-1]["eval_loss"]) < 1e-4

    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(out / "final"))
    predictions = fill("doc 7: alpha [MASK] gamma")
    assert len(predictions) == 5 and all("[MASK]" not in p["sequence"] for p in predictions)
    assert 0.0 < sum(p["score"] for p in predictions) <= 1.0 + 1e-6
