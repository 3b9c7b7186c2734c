"""Packed batches from prepared shards, resumable under any world size.

The split's shards are one virtual token stream. Sample k is the window of `seq_len` tokens
starting at k * seq_len (the last window is padded), so every token is in exactly one sample
per epoch. Samples are visited in one *global* order, fixed by (seed, epoch) alone:

    global position g -> epoch g // num_samples -> sample perm_epoch(g % num_samples)

Rank r of W takes positions consumed + r, consumed + r + W, ... . The only state is `consumed`,
the number of global positions all ranks together have used, so a job can stop under W ranks
and resume under W' ranks with no sample lost or repeated (Megatron-LM, torchtitan and litdata
tie their loader state to the rank count). The epoch permutation is a keyed Feistel network:
O(1) memory however many samples there are.

A batch follows the packed-batch contract (docs/data.md, "The packed loader"):
  input_ids, labels, position_ids  [B, seq_len] int64; positions restart at each document
  cu_seqlens                       int32 [segments + 1] over the flattened batch
  max_seqlen                       int
  sample_ids                       [B] which windows these are (for logs and tests)
  real_tokens                      int: positions holding data, not padding (for throughput)
  attended_pairs                   int: sum of squared attention-segment lengths, padding
                                   excluded (attention FLOPs, train/flops.py)
  labels                           [B, seq_len], unless the task makes its own (next_token_labels=False)
Labels are the next token within the same document; the position holding a document's EOS
predicts nothing (-100), so no token is predicted from another document. A document piece that
starts mid-document (the document was longer than the window) continues its position ids.
Documents longer than `max_positions` restart positions and attention every `max_positions`
tokens, so position ids always fit the model's position table.

Chat SFT shards (index task "sft") are conversations that need not end in EOS (and a template's
end-of-turn may be the EOS id itself): their boundaries come from the conversation-start bit of
the mask codes beside the tokens (train/data/chat.py), never from the EOS id.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.errors import DataError
from train.data.chat import CONVERSATION_START
from train.data.shards import ShardIndex

IGNORE_INDEX = -100


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast, well-distributed hash of uint64s."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A pseudo-random bijection of [0, n) keyed by (seed, epoch), evaluated element-wise.

    A balanced Feistel network permutes [0, 4**half) for half = ceil(log2(n) / 2); values that
    land outside [0, n) are walked through the network again until they land inside (cycle
    walking keeps it a bijection on [0, n); the domain is under 4n, so under 4 walks on average).
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        self.half = max(1, math.ceil(math.log2(max(n, 2)) / 2))
        key = (seed * 0x9E3779B97F4A7C15 + epoch) & 0xFFFFFFFFFFFFFFFF
        base = mix64(np.array([key], dtype=np.uint64))
        self.keys = mix64(base + np.arange(1, self.ROUNDS + 1, dtype=np.uint64))

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        mask = np.uint64((1 << self.half) - 1)
        left, right = x >> np.uint64(self.half), x & mask
        for key in self.keys:
            with np.errstate(over="ignore"):
                left, right = right, left ^ (mix64(right + key) & mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        out = self._rounds(np.asarray(idx, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._rounds(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


class MappedStream:
    """Shard files of one split as one memory-mapped array."""

    def __init__(self, root: Path, records, dtype: np.dtype):
        self.maps = [np.memmap(root / r.file, dtype=dtype.newbyteorder("<"), mode="r")
                     for r in records]
        sizes = np.array([len(m) for m in self.maps], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values [start, min(stop, num_tokens)) as int64, across shard boundaries."""
        stop = min(stop, self.num_tokens)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            local = start - self.offsets[first]
            take = min(stop, self.offsets[first + 1]) - start
            parts.append(self.maps[first][local:local + take])
            start += take
            first += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


class TokenStream(MappedStream):
    """The token shards of one split, with its document ends."""

    def __init__(self, index: ShardIndex, split: str):
        super().__init__(index.root, index.shards(split), index.dtype)
        self.eos_id = index.eos_id
        # Where each document ends (its EOS), across the whole stream: 8 bytes per document, one
        # sequential read at open. It gives the document start of a window's first token.
        if index.task == "sft":  # conversations: from their start bits, never the EOS id
            self.conversation_codes = MappedStream(index.root, index.label_shards(split),
                                                   index.label_dtype)
            starts = np.concatenate([
                np.flatnonzero(m & CONVERSATION_START) + off for m, off in
                zip(self.conversation_codes.maps, self.conversation_codes.offsets[:-1])])
            self.doc_ends = np.append(starts[1:] - 1, self.num_tokens - 1).astype(np.int64)
        else:
            self.conversation_codes = None
            self.doc_ends = np.concatenate([np.flatnonzero(m == self.eos_id) + off
                                            for m, off in zip(self.maps, self.offsets[:-1])])

    def doc_start(self, positions: np.ndarray) -> np.ndarray:
        """The stream offset where the document holding each position begins."""
        before = np.searchsorted(self.doc_ends, positions, side="left") - 1
        return np.where(before >= 0, self.doc_ends[np.maximum(before, 0)] + 1, 0)

    def whole_document_windows(self, seq_len: int) -> np.ndarray:
        """Window starts (and the stream end) for windows of whole documents: each window takes
        as many consecutive documents as fit in seq_len; a longer document is cut every seq_len
        tokens. Greedy and in order, so the windows depend only on the data."""
        starts, start, ends = [0], 0, self.doc_ends
        while start < self.num_tokens:
            last = int(np.searchsorted(ends, start + seq_len - 1, side="right")) - 1
            start = int(ends[last]) + 1 if last >= 0 and ends[last] >= start else start + seq_len
            starts.append(min(start, self.num_tokens))
        return np.array(starts, dtype=np.int64)


@dataclass
class LoaderState:
    consumed: int  # global positions used by all ranks together
    seed: int
    seq_len: int
    num_samples: int
    shuffle: bool


class PackedLoader:
    """Iterates packed micro-batches of one rank. See the module docstring for the order."""

    def __init__(self, data_dir: str | Path, split: str = "train", *, seq_len: int,
                 micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, max_positions: int | None = None, verify: str = "sample",
                 whole_documents: bool = False, label_codes: bool = False,
                 next_token_labels: bool = True):
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must "
                            f"be at least 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.index = ShardIndex.load(data_dir)
        if verify != "none":
            self.index.verify(split, full=(verify == "full"))
        self.stream = TokenStream(self.index, split)
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.max_positions = max_positions
        if whole_documents:
            self.window_starts = self.stream.whole_document_windows(seq_len)
        else:
            self.window_starts = np.append(np.arange(0, self.stream.num_tokens, seq_len),
                                           self.stream.num_tokens)
        self.whole_documents = whole_documents
        self.next_token_labels = next_token_labels  # False: the task makes the labels itself
        self.num_samples = len(self.window_starts) - 1
        self.labels = None
        # token classification's labels, or chat SFT's loss-mask codes: the stream beside the tokens
        if label_codes or self.stream.conversation_codes is not None:
            self.labels = MappedStream(self.index.root, self.index.label_shards(split),
                                       self.index.label_dtype)
        self.consumed = 0
        self._perm_epoch, self._perm = None, None

    # ---- order ------------------------------------------------------------------------------
    def sample_ids(self, positions: np.ndarray) -> np.ndarray:
        """Global positions -> sample ids, epoch by epoch."""
        epochs, within = np.divmod(positions, self.num_samples)
        if not self.shuffle:
            return within
        out = np.empty_like(within)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = FeistelPermutation(self.num_samples, self.seed, int(epoch))(within[chosen])
        return out

    def __iter__(self):
        """Endless micro-batches (epochs roll over) for training."""
        step = self.micro_batch_size * self.world_size
        while True:
            positions = self.consumed + self.rank + self.world_size * np.arange(self.micro_batch_size)
            self.consumed += step
            yield self.batch(self.sample_ids(positions), positions // self.num_samples)

    def one_pass(self):
        """Each sample of the split once, in order, shared across ranks (for evaluation). The
        last batch of a rank may be smaller, and a rank may get one batch fewer than another."""
        mine = np.arange(self.rank, self.num_samples, self.world_size)
        for i in range(0, len(mine), self.micro_batch_size):
            yield self.batch(mine[i:i + self.micro_batch_size])

    def real_tokens_by_source(self, start: int, stop: int) -> np.ndarray:
        """Tokens that are data, not padding, in global positions [start, stop) of all ranks
        together: what the batches of those positions hold in `real_tokens`, summed, computed
        from the order alone (no collective). One entry: this loader is one source."""
        lengths = np.diff(self.window_starts)
        return np.array([int(lengths[self.sample_ids(np.arange(start, stop))].sum())])

    # ---- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return LoaderState(self.consumed, self.seed, self.seq_len, self.num_samples,
                           self.shuffle).__dict__

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved loader stopped; the world size may differ."""
        if "mixture" in state:
            raise DataError(f"the checkpoint's loader read data.mixture {state['mixture']} but "
                            f"this run reads data.path: resume with the same data, or start "
                            f"afresh")
        for key in ("seed", "seq_len", "num_samples", "shuffle"):
            if state[key] != getattr(self, key):
                raise DataError(f"the checkpoint's loader has {key}={state[key]} but this run has "
                                f"{key}={getattr(self, key)}: resume with the same data and "
                                f"{'data.seq_len' if key == 'seq_len' else key}, or start afresh")
        # `consumed` counts global positions, so under any world size rank r simply continues
        # with positions consumed + r, consumed + r + W', ...
        self.consumed = int(state["consumed"])

    # ---- assembly ---------------------------------------------------------------------------
    def batch(self, sample_ids: np.ndarray, epochs: np.ndarray | None = None) -> dict:
        """Build the packed batch for these samples (numpy; torch tensors via `as_torch`)."""
        L, stream = self.seq_len, self.stream
        B = len(sample_ids)
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        starts = self.window_starts[sample_ids]
        # A fixed window reads one token more, the last position's next-token target; a window
        # of whole documents ends where the next begins.
        stops = self.window_starts[sample_ids + 1] if self.whole_documents else starts + L + 1
        window = np.full((B, L + 1), stream.eos_id, dtype=np.int64)
        valid = np.zeros((B, L + 1), dtype=bool)  # False: padding
        codes = np.full((B, L), -1, dtype=np.int64) if self.labels is not None else None
        for row, (start, stop) in enumerate(zip(starts, stops)):
            tokens = stream.read(int(start), int(stop))
            window[row, :len(tokens)] = tokens
            valid[row, :len(tokens)] = True
            if codes is not None:
                row_codes = self.labels.read(int(start), min(int(stop), int(start) + L))
                codes[row, :len(row_codes)] = row_codes
        input_ids, targets = window[:, :L], window[:, 1:]
        if stream.conversation_codes is not None:  # a conversation ends where the next starts
            starts_next = np.zeros((B, L), dtype=bool)
            starts_next[:, :-1] = (codes[:, 1:] >= 0) & (codes[:, 1:] & CONVERSATION_START > 0)
            is_eos = starts_next & valid[:, :L]
        else:
            is_eos = (input_ids == stream.eos_id) & valid[:, :L]

        # Start of the document of each token: the window's first token inherits its document's
        # start from the stream; after every EOS a new document begins; padding forms its own.
        absolute = starts[:, None] + np.arange(L)
        doc_start = np.full((B, L), -1, dtype=np.int64)
        doc_start[:, 0] = stream.doc_start(starts)
        after_eos = np.zeros((B, L), dtype=bool)
        after_eos[:, 1:] = is_eos[:, :-1]
        pad_start = ~valid[:, :L] & np.concatenate([np.ones((B, 1), bool), valid[:, :L - 1]], 1)
        new_doc = after_eos | pad_start
        doc_start[new_doc] = absolute[new_doc]
        doc_start = np.maximum.accumulate(doc_start, axis=1)
        position_ids = absolute - doc_start
        if self.max_positions:
            position_ids %= self.max_positions

        cu_seqlens, lengths = segments(position_ids)
        real = valid[:, :L].reshape(-1)
        real_segments = real[cu_seqlens[:-1]]  # padding forms segments of its own
        batch = {"input_ids": input_ids, "position_ids": position_ids,
                 "cu_seqlens": cu_seqlens, "max_seqlen": int(lengths.max()),
                 "sample_ids": sample_ids, "real_tokens": int(real.sum()),
                 "attended_pairs": int((lengths[real_segments] ** 2).sum()),
                 "epochs": np.zeros(B, np.int64) if epochs is None else np.asarray(epochs, np.int64)}
        if self.next_token_labels:
            batch["labels"] = np.where(is_eos | ~valid[:, 1:] | ~valid[:, :L], IGNORE_INDEX, targets)
        if codes is not None:
            batch["label_codes"] = codes
        return batch


def segments(position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cu_seqlens (int32) and segment lengths of a [B, L] batch: a segment starts at a new
    document, a position restart, or the start of a row."""
    B, L = position_ids.shape
    boundary = position_ids == 0
    boundary[:, 0] = True
    flat = np.flatnonzero(boundary.reshape(-1))
    cu_seqlens = np.append(flat, B * L).astype(np.int32)
    return cu_seqlens, np.diff(cu_seqlens).astype(np.int64)


def num_windows(index: ShardIndex, split: str, seq_len: int, whole_documents: bool = False) -> int:
    """How many samples PackedLoader makes of a split (one pass), without opening a loader:
    arithmetic for fixed windows; a scan of the document ends for windows of whole documents."""
    if whole_documents:
        return len(TokenStream(index, split).whole_document_windows(seq_len)) - 1
    return -(-sum(r.num_tokens for r in index.shards(split)) // seq_len)


def as_torch(batch: dict, device=None) -> dict:
    """numpy batch -> torch tensors (zero-copy on CPU)."""
    import torch

    return {k: (torch.from_numpy(np.ascontiguousarray(v)).to(device) if isinstance(v, np.ndarray)
                else v) for k, v in batch.items()}
