"""Weighted mixtures of prepared directories: one global sample order over several sources.

    data:
      mixture:
        - {path: data/code, weight: 0.7}
        - {path: data/prose, weight: 0.3, max_epochs: 4}

A weight is a fraction of the training samples, and with fixed windows of seq_len tokens a
sample is seq_len tokens, so it is a fraction of the training tokens. The weights are taken as
written (0.7 is 7/10, not its binary neighbour) and normalized to integer shares a_i of a period
of D samples (sum a_i = D, D the least common denominator).

The order is a fixed schedule of one period, repeated, with no random draws:

    global position g -> (q, s) = divmod(g, D) -> source i = slot_source[s],
                         its stream position q * a_i + slot_index[s]

and that source's stream position j is its sample perm_epoch(j % n_i) of epoch j // n_i, by the
source's own keyed Feistel permutation (seeded by the run's seed and the source's name), exactly
as PackedLoader orders one directory. The loader's only state is still the global position, so
a run resumes exactly, also under another world size (rank r takes positions consumed + r,
consumed + r + W, ...).

The period is filled by earliest deadline first: source i's m-th sample may go at slot n (1-based)
once m < p_i n (upper quota) and must have gone by the first n with p_i n >= m + 1 (lower quota).
Unit jobs with integer release times and deadlines on one machine: EDF meets every deadline when
any order does, and Balinski and Young's quota method (1975) is such an order. So at every prefix
of n samples each source has floor(p_i n) or ceil(p_i n) of them: within one sample of
weight x n. At n = D every count is exactly a_i, so the period repeats with the same bound.
"""
from __future__ import annotations

import heapq
import math
import zlib
from fractions import Fraction

import numpy as np

from train.errors import DataError
from train.data.loader import PackedLoader, segments

# The longest period tabled: two int64 arrays of this length (1.6 MB), built once per loader in
# 0.16 s (measured with 3 sources on the 2-core AMD EPYC dev machine). Small integer ratios, and
# weights of up to 5 decimals that sum to 1, fit exactly; other weights are rounded to shares of
# this period, which preflight reports in a note.
MAX_PERIOD = 100_000


def integer_shares(weights) -> tuple[list[int], int, bool]:
    """(a_i, D, rounded): the weights as shares a_i / D of their sum. Exact when D fits
    MAX_PERIOD; otherwise largest-remainder shares of MAX_PERIOD, and rounded is True."""
    exact = [Fraction(repr(float(w))) for w in weights]
    total = sum(exact)
    fractions = [w / total for w in exact]
    period = math.lcm(*(f.denominator for f in fractions))
    if period <= MAX_PERIOD:
        return [int(f * period) for f in fractions], period, False
    quotas = [f * MAX_PERIOD for f in fractions]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: quotas[i] - shares[i], reverse=True)
    for i in by_remainder[:MAX_PERIOD - sum(shares)]:
        shares[i] += 1
    common = math.gcd(*shares)
    return [a // common for a in shares], MAX_PERIOD // common, True


def edf_period(shares: list[int], period: int) -> tuple[np.ndarray, np.ndarray]:
    """(slot_source, slot_index) of one period: which source each slot goes to and how many
    of that source's samples came before it in the period."""
    slot_source = np.empty(period, np.int64)
    slot_index = np.empty(period, np.int64)
    taken = [0] * len(shares)
    # (release slot, source) of each source's next sample; (deadline slot, source) once released
    pending = [(1, i) for i, a in enumerate(shares) if a > 0]
    ready: list[tuple[int, int]] = []
    for n in range(1, period + 1):
        while pending and pending[0][0] <= n:
            _, i = heapq.heappop(pending)
            heapq.heappush(ready, (-(-(taken[i] + 1) * period // shares[i]), i))
        deadline, i = heapq.heappop(ready)
        if deadline < n:  # impossible by the argument above; never a silently wrong mixture
            raise RuntimeError(f"mixture schedule missed a deadline at slot {n} of {period}")
        slot_source[n - 1], slot_index[n - 1] = i, taken[i]
        taken[i] += 1
        if taken[i] < shares[i]:
            heapq.heappush(pending, (taken[i] * period // shares[i] + 1, i))
    return slot_source, slot_index


class MixtureSchedule:
    """Which source, and which of its stream positions, each global position is."""

    def __init__(self, weights):
        self.shares, self.period, self.rounded = integer_shares(weights)
        self.slot_source, self.slot_index = edf_period(self.shares, self.period)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (source, position in that source's stream)."""
        q, s = np.divmod(np.asarray(positions, dtype=np.int64), self.period)
        source = self.slot_source[s]
        return source, q * np.asarray(self.shares, np.int64)[source] + self.slot_index[s]

    def counts(self, n: int) -> np.ndarray:
        """How many of the first n global positions each source has."""
        q, r = divmod(n, self.period)
        return (q * np.asarray(self.shares, np.int64)
                + np.bincount(self.slot_source[:r], minlength=len(self.shares)))

    def fractions(self) -> list[Fraction]:
        return [Fraction(a, self.period) for a in self.shares]


def source_seed(seed: int, name: str) -> int:
    """A source's permutation key: the run's seed and the source's name (not its place in the
    list, so reordering the list leaves each source's own order as it was)."""
    return zlib.crc32(f"{seed}:{name}".encode())


class MixtureLoader:
    """PackedLoader's interface over several sources in the mixture's global order.

    sources: objects with .path, .weight and .name (config's MixtureSource). Batches carry
    `source_ids` [B] beside the usual keys, and `sample_ids` numbered across the mixture (source
    i's sample k is offset_i + k), so per-sample keys such as MLM's masking stay distinct."""

    def __init__(self, sources, split: str = "train", *, seq_len: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 **options):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.names = [s.name for s in sources]
        self.schedule = MixtureSchedule([s.weight for s in sources])
        # each source assembles its own windows; micro_batch_size, rank and world size are
        # this loader's business, not theirs
        self.sources = [PackedLoader(s.path, split, seq_len=seq_len, micro_batch_size=1,
                                     seed=source_seed(seed, s.name), shuffle=shuffle, **options)
                        for s in sources]
        self.seq_len, self.micro_batch_size, self.seed, self.shuffle = (seq_len, micro_batch_size,
                                                                        seed, shuffle)
        self.rank, self.world_size = rank, world_size
        sizes = [s.num_samples for s in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.consumed = 0

    def __iter__(self):
        """Endless micro-batches of this rank, in the global order (as PackedLoader)."""
        step = self.micro_batch_size * self.world_size
        while True:
            positions = self.consumed + self.rank + self.world_size * np.arange(self.micro_batch_size)
            self.consumed += step
            yield self.batch_at(positions)

    def draw(self, positions: np.ndarray):
        """Global positions -> (source, sample id within the source, epoch of the source)."""
        source, stream = self.schedule.locate(positions)
        sample, epoch = np.empty_like(stream), np.empty_like(stream)
        for i in np.unique(source):
            chosen = source == i
            sample[chosen] = self.sources[i].sample_ids(stream[chosen])
            epoch[chosen] = stream[chosen] // self.sources[i].num_samples
        return source, sample, epoch

    def batch_at(self, positions: np.ndarray) -> dict:
        """The packed batch of these global positions, rows in position order."""
        source, sample, epoch = self.draw(positions)
        parts = {int(i): self.sources[i].batch(sample[source == i], epoch[source == i])
                 for i in np.unique(source)}
        first = next(iter(parts.values()))
        batch = {}
        for key, value in first.items():
            if isinstance(value, np.ndarray) and key != "cu_seqlens":  # per-row arrays
                rows = np.empty((len(positions), *value.shape[1:]), value.dtype)
                for i, part in parts.items():
                    rows[source == i] = part[key]
                batch[key] = rows
        batch["cu_seqlens"], lengths = segments(batch["position_ids"])
        batch["max_seqlen"] = int(lengths.max())
        for key in ("real_tokens", "attended_pairs"):  # sums over rows: segments never span rows
            batch[key] = sum(part[key] for part in parts.values())
        batch["sample_ids"] = self.offsets[source] + sample
        batch["source_ids"] = source
        return batch

    def real_tokens_by_source(self, start: int, stop: int) -> np.ndarray:
        """Tokens that are data, not padding, per source, in global positions [start, stop) of
        all ranks together (PackedLoader.real_tokens_by_source, per source)."""
        source, sample, _ = self.draw(np.arange(start, stop))
        counts = np.zeros(len(self.sources), np.int64)
        for i in np.unique(source):
            counts[i] = np.diff(self.sources[i].window_starts)[sample[source == i]].sum()
        return counts

    # ---- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "shuffle": self.shuffle, "mixture": self.identity()}

    def identity(self) -> list[dict]:
        return [{"name": n, "share": str(f), "num_samples": s.num_samples}
                for n, f, s in zip(self.names, self.schedule.fractions(), self.sources)]

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved loader stopped; the world size may differ, the mixture not."""
        if state.get("mixture") != self.identity():
            raise DataError(f"the checkpoint's loader read {state.get('mixture') or 'data.path'} "
                            f"but this run's data.mixture is {self.identity()}: resume with the "
                            f"same sources, weights and data, or start afresh")
        for key in ("seed", "seq_len", "shuffle"):
            if state[key] != getattr(self, key):
                raise DataError(f"the checkpoint's loader has {key}={state[key]} but this run has "
                                f"{key}={getattr(self, key)}: resume with the same value, or "
                                f"start afresh")
        self.consumed = int(state["consumed"])
