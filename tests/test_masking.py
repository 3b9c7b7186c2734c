"""MLM masking at batch time: rates, whole words, determinism, and the word-start tables."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import many_docs
from train.data.loader import IGNORE_INDEX, PackedLoader
from train.data.masking import VocabularyTables, mask_tokens
from train.tasks import MaskedLM


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory, corpus_dir):
    """The test corpus prepared for MLM: WordPiece tokenizer, [CLS] doc [SEP] documents. The
    vocabulary is small so that many words take several pieces."""
    from train.prepare import main

    out = tmp_path_factory.mktemp("mlm")
    assert main(["--task", "mlm", "--input", str(corpus_dir / "a.jsonl"), "--input",
                 str(corpus_dir / "b.jsonl"), "--output", str(out), "--train-tokenizer", "150",
                 "--val-fraction", "0.1", "--workers", "1", "--no-progress"]) == 0
    return out


def tables_of(data) -> tuple[VocabularyTables, PackedLoader]:
    loader = PackedLoader(data, "train", seq_len=64, micro_batch_size=64, shuffle=False)
    ids = loader.index.special_ids
    return VocabularyTables.from_tokenizer(data, loader.index.vocab_size, ids["mask_token"]), loader


def masked_batch(data, whole_word: bool, probability=0.15, seed=0, epoch=0):
    tables, loader = tables_of(data)
    batch = loader.batch(np.arange(min(64, loader.num_samples)))
    epochs = np.full(len(batch["sample_ids"]), epoch)
    masked, labels = mask_tokens(batch["input_ids"], batch["position_ids"], batch["sample_ids"],
                                 epochs, tables, probability=probability, whole_word=whole_word,
                                 seed=seed)
    return batch, masked, labels, tables


def test_documents_are_cls_text_sep(mlm_data):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(mlm_data / "tokenizer.json"))
    loader = PackedLoader(mlm_data, "train", seq_len=64, micro_batch_size=1, shuffle=False)
    first = loader.batch(np.array([0]))["input_ids"][0]
    assert tok.id_to_token(int(first[0])) == "[CLS]"
    sep = loader.index.eos_id
    assert tok.id_to_token(sep) == "[SEP]"
    after_sep = np.flatnonzero(first[:-1] == sep) + 1
    assert all(tok.id_to_token(int(first[i])) == "[CLS]" for i in after_sep)


def test_rates_specials_and_labels(mlm_data):
    batch, masked, labels, tables = masked_batch(mlm_data, whole_word=False)
    ids = batch["input_ids"]
    special = tables.special[ids]
    selected = labels != IGNORE_INDEX
    n = int((~special).sum())
    # Binomial(n, 0.15): n is ~4,000 here, so 5 standard deviations are ~0.03.
    sd = (0.15 * 0.85 / n) ** 0.5
    assert abs(selected.sum() / n - 0.15) < 5 * sd
    assert not (selected & special).any()  # [CLS], [SEP] and padding are never chosen
    assert (labels[selected] == ids[selected]).all()  # labels are the original ids
    assert (masked[~selected] == ids[~selected]).all()  # unselected tokens are untouched
    k = int(selected.sum())
    to_mask = (masked == tables.mask_id) & selected
    kept = (masked == ids) & selected
    randomised = selected & ~to_mask & ~kept
    sd_split = (0.1 * 0.9 / k) ** 0.5
    assert abs(to_mask.sum() / k - 0.8) < 5 * (0.8 * 0.2 / k) ** 0.5
    # a random id equal to the original counts as kept: 1 / vocab of them, within tolerance
    assert abs(kept.sum() / k - 0.1) < 5 * sd_split + 1 / len(tables.replacement_ids)
    assert abs(randomised.sum() / k - 0.1) < 5 * sd_split
    assert not tables.special[masked[randomised]].any()  # random ids are never special ones


def word_spans(tokens: list[str], ids, tables):
    """Words as the tokenizer defines them: a token without ## and its ## continuations."""
    spans, start = [], None
    for i, token in enumerate(tokens):
        if tables.special[ids[i]]:
            if start is not None:
                spans.append((start, i))
            start = None
        elif not token.startswith("##") or start is None:
            if start is not None:
                spans.append((start, i))
            start = i
    if start is not None:
        spans.append((start, len(tokens)))
    return spans


@pytest.mark.parametrize("whole_word", [True, False])
def test_whole_word_masking_masks_whole_words(mlm_data, whole_word):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(mlm_data / "tokenizer.json"))
    batch, masked, labels, tables = masked_batch(mlm_data, whole_word=whole_word, probability=0.3)
    partial = whole = multi_piece_words = 0
    for row in range(len(labels)):
        ids = batch["input_ids"][row]
        tokens = [tok.id_to_token(int(i)) for i in ids]
        for a, b in word_spans(tokens, ids, tables):
            if b - a < 2 or a == 0:  # one piece, or cut by the window's start
                continue
            multi_piece_words += 1
            chosen = labels[row, a:b] != IGNORE_INDEX
            partial += chosen.any() and not chosen.all()
            whole += chosen.all()
    assert multi_piece_words > 100
    if whole_word:
        assert partial == 0 and whole > 0.2 * multi_piece_words  # 0.3 of words selected
    else:  # token-level masking splits words: the check above can fail
        assert partial > 20


def test_masking_depends_only_on_seed_sample_and_epoch(mlm_data):
    tables, loader = tables_of(mlm_data)
    batch = loader.batch(np.arange(8))
    args = (batch["input_ids"], batch["position_ids"], batch["sample_ids"])
    options = dict(probability=0.15, whole_word=True)
    a = mask_tokens(*args, np.zeros(8, int), tables, seed=1, **options)
    b = mask_tokens(*args, np.zeros(8, int), tables, seed=1, **options)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # one sample alone (another rank, another batch) gets the same masking
    single = loader.batch(np.array([5]))
    alone = mask_tokens(single["input_ids"], single["position_ids"], single["sample_ids"],
                        np.zeros(1, int), tables, seed=1, **options)
    assert np.array_equal(alone[1][0], a[1][5])
    next_epoch = mask_tokens(*args, np.ones(8, int), tables, seed=1, **options)
    other_seed = mask_tokens(*args, np.zeros(8, int), tables, seed=2, **options)
    assert not np.array_equal(next_epoch[1], a[1]) and not np.array_equal(other_seed[1], a[1])


def test_eval_masking_is_fixed_and_training_masking_changes_by_epoch(mlm_data):
    from train.config import Config

    cfg = Config()
    loader = PackedLoader(mlm_data, "validation", seq_len=64, micro_batch_size=4, shuffle=False)
    task = MaskedLM(cfg, loader.index)
    first = [task.eval_batch(b) for b in loader.one_pass()]
    again = [task.eval_batch(b) for b in loader.one_pass()]
    assert all(np.array_equal(x["labels"], y["labels"]) and np.array_equal(x["input_ids"], y["input_ids"])
               for x, y in zip(first, again))
    # the same split read by 2 ranks gives each sample the same eval masking
    by_sample = {int(s): row for b in first for s, row in zip(b["sample_ids"], b["labels"])}
    for rank in range(2):
        shard = PackedLoader(mlm_data, "validation", seq_len=64, micro_batch_size=3, rank=rank,
                             world_size=2, shuffle=False)
        for b in map(task.eval_batch, shard.one_pass()):
            for s, row in zip(b["sample_ids"], b["labels"]):
                assert np.array_equal(row, by_sample[int(s)])
    train = PackedLoader(mlm_data, "train", seq_len=64, micro_batch_size=2, shuffle=False)
    epoch0 = task.train_batch(train.batch(np.array([0, 1]), np.array([0, 0])))
    epoch1 = task.train_batch(train.batch(np.array([0, 1]), np.array([1, 1])))
    assert not np.array_equal(epoch0["labels"], epoch1["labels"])  # dynamic masking


def test_word_start_tables_for_wordpiece_and_byte_level_bpe(tmp_path):
    from train.data.tokenizer import save_pretrained, train_bpe, train_wordpiece

    texts = many_docs(200)
    for train_fn, name in ((train_wordpiece, "wp"), (train_bpe, "bpe")):
        out = tmp_path / name
        out.mkdir()
        tok = train_fn(iter(texts), 400)
        save_pretrained(tok, out)
        vocab = tok.get_vocab()
        mask = vocab.get("[MASK]", 0)
        tables = VocabularyTables.from_tokenizer(out, len(vocab), mask)
        for token, i in vocab.items():
            if tables.special[i]:
                continue
            # byte-level BPE: a space (Ġ), newline (Ċ), tab (ĉ) or CR (č) opens a word
            expected = not token.startswith("##") if name == "wp" else token[0] in "ĠĊĉč"
            assert tables.word_start[i] == expected, token


def test_tokenizer_without_a_mask_token_is_a_clear_error(prepared):
    from train.errors import DataError

    with pytest.raises(DataError, match="no mask token"):
        VocabularyTables.from_tokenizer(prepared, 512, None)
