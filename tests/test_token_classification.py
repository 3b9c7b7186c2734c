"""Token classification: CoNLL input through prepare, label alignment to sub-tokens, whole-
sentence windows, bad input, and a real 2-rank run whose export works in the pipeline."""
from __future__ import annotations

import json

import pytest

from helpers import (REPO, read_metrics, run_cli, run_train, synthetic_ner, write_conll,
                     write_jsonl)
from train.data.loader import IGNORE_INDEX, PackedLoader
from train.tasks import TokenClassification

CONFIG = str(REPO / "configs" / "tiny-token-classification.yaml")


def prepare(*args):
    return run_cli("-m", "train.prepare", "--task", "token-classification", "--no-progress",
                   "--workers", "1", *args)


def config(label_all_tokens: bool):
    from train.config import Config

    cfg = Config(task="token-classification")
    cfg.data.label_all_tokens = label_all_tokens
    return cfg


def test_index_has_the_label_set_in_id2label_order(ner_data):
    index = json.loads((ner_data / "index.json").read_text())
    assert index["task"] == "token-classification"
    assert index["labels"]["names"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert set(index["labels"]["splits"]) == {"train", "validation"}


@pytest.mark.parametrize("label_all_tokens", [False, True])
def test_labels_are_aligned_to_sub_tokens(ner_data, label_all_tokens):
    """Every sentence of the batch, checked against the tokenizer's own word_ids: -100 on
    [CLS]/[SEP]/padding, the word's label on its first piece, -100 or B->I on the others."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ner_data))
    loader = PackedLoader(ner_data, "train", seq_len=64, micro_batch_size=4, shuffle=False,
                          whole_documents=True, label_codes=True)
    task = TokenClassification(config(label_all_tokens), loader.index)
    names = loader.index.label_names
    sentences = iter(synthetic_ner(600, seed=0))
    continuation_seen = 0
    for batch in map(task.train_batch, loader.one_pass()):
        ids, labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
        cu = batch["cu_seqlens"]
        for a, b in zip(cu[:-1], cu[1:]):
            if ids[a] != tok.cls_token_id:  # padding at the end of a window
                assert (labels[a:b] == IGNORE_INDEX).all()
                continue
            words, tags = next(sentences)
            enc = tok(words, is_split_into_words=True)
            assert ids[a:b].tolist() == enc["input_ids"]  # [CLS] pieces [SEP]
            previous = None
            for i, word in enumerate(enc.word_ids()):
                got = labels[a + i]
                if word is None:
                    assert got == IGNORE_INDEX
                elif word != previous:
                    assert names[got] == tags[word]
                elif label_all_tokens:
                    continuation_seen += 1
                    assert names[got] == tags[word].replace("B-", "I-")
                else:
                    continuation_seen += 1
                    assert got == IGNORE_INDEX
                previous = word
    assert continuation_seen > 100 and next(sentences, None) is None  # every sentence, in order


def test_windows_hold_whole_sentences(ner_data):
    loader = PackedLoader(ner_data, "train", seq_len=48, micro_batch_size=8, shuffle=False,
                          whole_documents=True)
    cls_id = loader.index.special_ids["cls_token"]
    for batch in loader.one_pass():
        assert (batch["input_ids"][:, 0] == cls_id).all()  # a window starts a sentence
        assert (batch["position_ids"][:, 0] == 0).all()


def test_jsonl_input_with_integer_tags_and_label_names(tmp_path):
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    records = [{"tokens": w, "ner_tags": [names.index(t) for t in tags]}
               for w, tags in synthetic_ner(50)]
    write_jsonl(tmp_path / "train.jsonl", records)
    res = prepare("--input", str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "out"),
                  "--train-tokenizer", "200", "--label-names", ",".join(names))
    assert res.returncode == 0, res.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["labels"]["names"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.mark.parametrize("case", ["malformed line", "unknown scheme", "validation label"])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, case):
    train = write_conll(tmp_path / "train.conll", synthetic_ner(20))
    lines = train.read_text().splitlines()
    valid = tmp_path / "valid.conll"
    valid.write_text(train.read_text())
    if case == "malformed line":
        lines[5] = "just-one-column"
        train.write_text("\n".join(lines))
        expected = ["train.conll:6", "just-one-column"]
    elif case == "unknown scheme":
        lines[4] = lines[4].rsplit(" ", 1)[0] + " S-PER"
        train.write_text("\n".join(lines))
        expected = ["unknown tag scheme", "S-PER", "train.conll:5", "IOB"]
    else:
        valid.write_text(valid.read_text() + "\nZorg NN O B-ALIEN\n")
        expected = ["B-ALIEN", "valid.conll"]
    out = tmp_path / "out"
    res = prepare("--input", str(train), "--validation-input", str(valid), "--output", str(out),
                  "--train-tokenizer", "200")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for text in expected:
        assert text in res.stderr, (text, res.stderr)
    assert not (out / "index.json").exists()


@pytest.mark.slow
def test_two_ranks_reach_high_f1_and_the_export_works_in_the_pipeline(ner_data, tmp_path):
    out = tmp_path / "run"
    res = run_train(CONFIG, f"data.path={ner_data}", f"output_dir={out}", "max_steps=60",
                    "eval_steps=30", "logging_steps=10", "save_steps=30",
                    "per_device_train_batch_size=8", "data.seq_len=64")
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(out)
    evals = [r for r in records if "eval_loss" in r]
    for key in ("eval_precision", "eval_recall", "eval_f1", "eval_accuracy"):
        assert all(0.0 <= r[key] <= 1.0 for r in evals), key
    assert evals[0]["eval_f1"] < 0.5  # an untrained head
    assert evals[-1]["eval_f1"] > 0.95, evals  # the set is easy: names come from short lists
    assert "eval f1" in res.stderr
    res = run_cli("-m", "train.evaluate", "--model", str(out / "final"), "--data", str(ner_data),
                  "--seq-len", "64")
    assert res.returncode == 0, res.stderr
    again = json.loads(res.stdout)
    for key in ("eval_loss", "eval_f1", "eval_precision", "eval_recall", "eval_accuracy"):
        assert abs(again[key] - evals[-1][key]) < 1e-4, key

    from transformers import pipeline

    tagger = pipeline("token-classification", model=str(out / "final"),
                      aggregation_strategy="simple")
    found = {(e["entity_group"], e["word"]) for e in tagger("Bob Smithsonian visited New York on Monday .")}
    assert ("PER", "Bob Smithsonian") in found and ("LOC", "New York") in found, found
