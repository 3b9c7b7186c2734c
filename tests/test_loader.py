"""The packed loader: batch contents against a per-token reference, coverage, shuffling, exact
resume (also under another world size), and integrity checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import EOS, random_docs, write_shard_dir
from train.errors import DataError
from train.data.loader import IGNORE_INDEX, FeistelPermutation, PackedLoader


def reference_sample(stream: list[int], k: int, L: int, max_positions: int | None):
    """The packed-batch contract, token by token, written for clarity rather than speed."""
    inputs, labels, positions, segment_keys = [], [], [], []
    for t in range(k * L, k * L + L):
        if t >= len(stream):  # padding after the end of the stream: a document of its own
            offset = t - len(stream)
            chunk = offset // max_positions if max_positions else 0
            inputs.append(EOS), labels.append(IGNORE_INDEX)
            positions.append(offset % max_positions if max_positions else offset)
            segment_keys.append(("pad", chunk))
            continue
        doc_start = t
        while doc_start > 0 and stream[doc_start - 1] != EOS:
            doc_start -= 1
        offset = t - doc_start
        chunk = offset // max_positions if max_positions else 0
        inputs.append(stream[t])
        # The EOS predicts nothing: the next token is another document's first.
        labels.append(IGNORE_INDEX if stream[t] == EOS or t + 1 >= len(stream) else stream[t + 1])
        positions.append(offset % max_positions if max_positions else offset)
        segment_keys.append((doc_start, chunk))
    boundaries = [i for i in range(L) if i == 0 or segment_keys[i] != segment_keys[i - 1]]
    real = [key[0] != "pad" for key in segment_keys]
    return inputs, labels, positions, boundaries, real


@pytest.mark.parametrize("seq_len,max_positions,shard_tokens", [(16, None, 50), (7, 5, 10_000),
                                                                 (64, 40, 333), (1, None, 20)])
def test_batches_match_the_per_token_reference(tmp_path, seq_len, max_positions, shard_tokens):
    rng = np.random.default_rng(0)
    stream = write_shard_dir(tmp_path, random_docs(rng, 40), shard_tokens)
    loader = PackedLoader(tmp_path, seq_len=seq_len, micro_batch_size=3, shuffle=False,
                          max_positions=max_positions)
    assert loader.num_samples == -(-len(stream) // seq_len)  # the last window is padded
    for ids in ([0, 1, 2], [loader.num_samples - 1], list(range(loader.num_samples))[::7]):
        batch = loader.batch(np.array(ids))
        cu, real_tokens, attended_pairs = [0], 0, 0
        for row, k in enumerate(ids):
            inputs, labels, positions, boundaries, real = reference_sample(stream, k, seq_len,
                                                                           max_positions)
            real_tokens += sum(real)
            for a, b in zip(boundaries, boundaries[1:] + [seq_len]):  # padding attends nothing real
                attended_pairs += (b - a) ** 2 if real[a] else 0
            assert batch["input_ids"][row].tolist() == inputs
            assert batch["labels"][row].tolist() == labels
            assert batch["position_ids"][row].tolist() == positions
            cu += [row * seq_len + b for b in boundaries[1:]] + [(row + 1) * seq_len]
        assert batch["cu_seqlens"].dtype == np.int32 and batch["cu_seqlens"].tolist() == cu
        assert batch["max_seqlen"] == max(np.diff(cu))
        assert batch["real_tokens"] == real_tokens  # what throughput and MFU count
        assert batch["attended_pairs"] == attended_pairs


def test_every_sample_once_per_epoch_across_ranks_and_shuffle_is_seeded(tmp_path):
    rng = np.random.default_rng(1)
    write_shard_dir(tmp_path, random_docs(rng, 120), shard_tokens=500)
    orders = {}
    for world_size in (1, 2, 3):
        loaders = [PackedLoader(tmp_path, seq_len=8, micro_batch_size=4, rank=r,
                                world_size=world_size, seed=7) for r in range(world_size)]
        n = loaders[0].num_samples
        iters = [iter(l) for l in loaders]
        per_rank = [[] for _ in range(world_size)]
        while loaders[0].consumed < 2 * n:  # two epochs, ranks in lockstep
            for r, it in enumerate(iters):
                per_rank[r] += next(it)["sample_ids"].tolist()
        # Ranks hold disjoint parts; together they interleave into one global order.
        global_order = [per_rank[p % world_size][p // world_size]
                        for p in range(sum(map(len, per_rank)))]
        assert sorted(global_order[:n]) == list(range(n))        # epoch 0: each sample once
        assert sorted(global_order[n:2 * n]) == list(range(n))   # epoch 1: again, once
        assert global_order[:n] != global_order[n:2 * n]         # reshuffled per epoch
        orders[world_size] = global_order[:n]
    assert orders[1] == orders[2] == orders[3]  # the order does not depend on the world size
    other = PackedLoader(tmp_path, seq_len=8, micro_batch_size=4, seed=8)
    assert other.sample_ids(np.arange(n)).tolist() != orders[1]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_is_a_permutation(n):
    for epoch in (0, 1):
        perm = FeistelPermutation(n, seed=3, epoch=epoch)(np.arange(n))
        assert sorted(perm.tolist()) == list(range(n))


def test_resume_is_exact_and_survives_a_world_size_change(tmp_path):
    rng = np.random.default_rng(2)
    write_shard_dir(tmp_path, random_docs(rng, 200), shard_tokens=1000)
    make = lambda r, w: PackedLoader(tmp_path, seq_len=16, micro_batch_size=2, rank=r,  # noqa
                                     world_size=w, seed=5)

    # Uninterrupted: 2 ranks, 10 steps.
    full = [make(r, 2) for r in range(2)]
    full_iters = [iter(l) for l in full]
    full_batches = [[next(it) for it in full_iters] for _ in range(10)]

    # Stopped after 4 steps, state saved (JSON round trip, as a checkpoint would), resumed.
    first = [make(r, 2) for r in range(2)]
    first_iters = [iter(l) for l in first]
    for _ in range(4):
        [next(it) for it in first_iters]
    state = json.loads(json.dumps(first[0].state_dict()))
    assert state == first[1].state_dict()
    resumed = [make(r, 2) for r in range(2)]
    for l in resumed:
        l.load_state_dict(state)
    resumed_iters = [iter(l) for l in resumed]
    for step in range(4, 10):
        for r, it in enumerate(resumed_iters):
            got, want = next(it), full_batches[step][r]
            for key in ("input_ids", "labels", "position_ids", "cu_seqlens", "sample_ids"):
                np.testing.assert_array_equal(got[key], want[key])

    # The same stop resumed under 3 ranks: the global sequence continues, nothing lost or
    # repeated: stop at 4 steps x 2 ranks x 2 samples = 16 positions, then 3 ranks go on.
    three = [make(r, 3) for r in range(3)]
    for l in three:
        l.load_state_dict(state)
    three_iters = [iter(l) for l in three]
    after = [[next(it)["sample_ids"].tolist() for it in three_iters] for _ in range(5)]
    seen = [s for step in full_batches[:4] for b in step for s in b["sample_ids"].tolist()]
    seen += [s for step in after for ids in step for s in ids]
    expected = make(0, 1).sample_ids(np.arange(16 + 5 * 3 * 2)).tolist()
    assert len(seen) == len(expected) and sorted(seen) == sorted(expected)
    assert len(set(seen)) == len(seen) <= three[0].num_samples  # all within one epoch: no repeat

    with pytest.raises(DataError, match="seq_len"):
        PackedLoader(tmp_path, seq_len=32, micro_batch_size=2, seed=5).load_state_dict(state)


def test_one_pass_covers_the_split_once_across_ranks(tmp_path):
    rng = np.random.default_rng(3)
    write_shard_dir(tmp_path, random_docs(rng, 50), shard_tokens=400)
    seen = []
    for r in range(3):
        loader = PackedLoader(tmp_path, seq_len=10, micro_batch_size=4, rank=r, world_size=3,
                              shuffle=False)
        seen += [s for b in loader.one_pass() for s in b["sample_ids"].tolist()]
    assert sorted(seen) == list(range(loader.num_samples))


def test_corruption_truncation_and_vocab_mismatch_stop_before_training(tmp_path):
    rng = np.random.default_rng(4)
    # One shard of 1.2M tokens (2.4 MB): larger than the sampled blocks of the cheap check.
    docs = [list(rng.integers(1, 1000, size=10_000)) for _ in range(120)]
    write_shard_dir(tmp_path, docs, shard_tokens=10**9)
    shard = tmp_path / "train-00000.bin"
    PackedLoader(tmp_path, seq_len=8, micro_batch_size=1)
    PackedLoader(tmp_path, seq_len=8, micro_batch_size=1, verify="full")

    original = shard.read_bytes()
    # A flip in the first block: the cheap sampled check sees it.
    shard.write_bytes(b"\x07" + original[1:])
    with pytest.raises(DataError, match="train-00000.bin fails its sampled checksum"):
        PackedLoader(tmp_path, seq_len=8, micro_batch_size=1)
    # A flip between sampled blocks: only the full check sees it, and it does.
    middle = 100_000
    shard.write_bytes(original[:middle] + bytes([original[middle] ^ 1]) + original[middle + 1:])
    PackedLoader(tmp_path, seq_len=8, micro_batch_size=1)
    with pytest.raises(DataError, match="fails its sha256 checksum"):
        PackedLoader(tmp_path, seq_len=8, micro_batch_size=1, verify="full")
    # Truncation.
    shard.write_bytes(original[:-2])
    with pytest.raises(DataError, match="truncated"):
        PackedLoader(tmp_path, seq_len=8, micro_batch_size=1)
    shard.write_bytes(original)

    loader = PackedLoader(tmp_path, seq_len=8, micro_batch_size=1)
    loader.index.check_vocab(1000)
    with pytest.raises(DataError, match="vocabulary of 1000 ids but the model has 512"):
        loader.index.check_vocab(512)
    with pytest.raises(DataError, match="different tokenizer"):
        loader.index.check_vocab(1000, model_tokenizer_sha256="other")


def test_missing_or_unfinished_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        PackedLoader(tmp_path / "nope", seq_len=8, micro_batch_size=1)
    (tmp_path / "train-00000.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="unfinished prepare"):
        PackedLoader(tmp_path, seq_len=8, micro_batch_size=1)


def test_loader_reads_a_prepared_directory(prepared):
    loader = PackedLoader(prepared, seq_len=32, micro_batch_size=4, max_positions=32)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].max() < 512
    val = PackedLoader(prepared, "validation", seq_len=32, micro_batch_size=4, shuffle=False)
    assert sum(b["input_ids"].shape[0] for b in val.one_pass()) == val.num_samples
