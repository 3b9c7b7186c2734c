"""data.mixture: the schedule's bound at every prefix, the mixture loader (per-source epochs,
exact resume under the same and another world size), the refusals through the real CLI, and one
2-rank training run on the embedded corpus mixed with a small second corpus."""
from __future__ import annotations

import io
import json
import random
import shutil
from contextlib import redirect_stderr
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import (TINY, TRICKY_DOCS, many_docs, random_docs, read_metrics, run_cli,
                     run_train, write_jsonl, write_shard_dir)
from train.errors import DataError
from train.data.mixture import MAX_PERIOD, MixtureLoader, MixtureSchedule


def realized(schedule: MixtureSchedule, n: int) -> np.ndarray:
    """[n, k]: how many of the first 1..n global positions each source has, counted one
    position at a time (the reference for `counts`)."""
    source, _ = schedule.locate(np.arange(n))
    return np.cumsum(np.eye(len(schedule.shares), dtype=np.int64)[source], axis=0)


@pytest.mark.parametrize("seed", range(6))
def test_every_prefix_is_within_one_sample_of_the_weights(seed):
    rng = random.Random(seed)
    for _ in range(25):
        weights = [round(rng.random() ** 2, rng.randint(1, 3)) for _ in range(rng.randint(2, 6))]
        if sum(weights) == 0:
            continue
        schedule = MixtureSchedule(weights)
        p = [Fraction(repr(w)) / sum(Fraction(repr(w)) for w in weights) for w in weights]
        assert schedule.fractions() == p  # exact: 0.7 is 7/10, not a binary neighbour
        n = 2 * schedule.period + 7  # the schedule repeats: two periods and a bit cover it
        counts = realized(schedule, n)
        prefix = np.arange(1, n + 1)[:, None]
        target = np.array([[float(x) for x in p]]) * prefix
        assert np.abs(counts - target).max() < 1, weights
        assert np.array_equal(counts[-1], schedule.counts(n))
        # within a source, its stream positions come in order: 0, 1, 2, ... (no skip, no repeat)
        source, stream = schedule.locate(np.arange(n))
        for i in range(len(weights)):
            assert stream[source == i].tolist() == list(range(int(counts[-1][i])))


def test_ratios_equal_fractions_and_long_weights_are_rounded_to_a_period():
    assert MixtureSchedule([3, 1]).fractions() == MixtureSchedule([0.75, 0.25]).fractions()
    assert MixtureSchedule([3, 0, 1]).counts(8).tolist() == [6, 0, 2]  # weight 0: never drawn
    rounded = MixtureSchedule([0.1234567, 0.8765433])
    assert rounded.rounded and rounded.period <= MAX_PERIOD
    assert abs(float(rounded.fractions()[0]) - 0.1234567) <= 1 / MAX_PERIOD
    counts = realized(rounded, rounded.period)
    target = np.array([[float(f) for f in rounded.fractions()]]) * np.arange(1, rounded.period + 1)[:, None]
    assert np.abs(counts - target).max() < 1  # the bound holds for the weights as rounded


@pytest.fixture
def two_sources(tmp_path):
    rng = np.random.default_rng(11)
    big, small = tmp_path / "big", tmp_path / "small"
    streams = {"big": write_shard_dir(big, random_docs(rng, 120), shard_tokens=700),
               "small": write_shard_dir(small, random_docs(rng, 4), shard_tokens=300)}
    sources = [SimpleNamespace(path=big, weight=0.6, name="big"),
               SimpleNamespace(path=small, weight=0.4, name="small")]
    return sources, streams


def mixture(sources, rank=0, world=1, batch=3):
    return MixtureLoader(sources, seq_len=16, micro_batch_size=batch, rank=rank,
                         world_size=world, seed=5)


def drawn(batches) -> list[tuple[int, int, int]]:
    """(source, sample within the source, epoch) of each row."""
    return [(int(s), int(k), int(e)) for b in batches
            for s, k, e in zip(b["source_ids"], b["sample_ids"], b["epochs"])]


def test_rows_are_their_sources_windows_and_each_source_reshuffles_per_epoch(two_sources):
    sources, _ = two_sources
    loader = mixture(sources)
    n_small = loader.sources[1].num_samples
    # enough positions for the small source's three epochs
    batches = [next(it) for it in [iter(loader)] for _ in range(int(3 * n_small / 0.4 / 3) + 1)]
    rows = drawn(batches)
    for batch in batches[:5]:  # each row is its source's own window, assembled alone
        for row, (s, k, _) in enumerate(drawn([batch])):
            own = loader.sources[s].batch(np.array([k - loader.offsets[s]]))
            for key in ("input_ids", "labels", "position_ids"):
                assert np.array_equal(batch[key][row], own[key][0]), key
        starts = np.flatnonzero(batch["position_ids"].reshape(-1) == 0)
        assert set(np.arange(0, batch["input_ids"].size, 16)) <= set(batch["cu_seqlens"][:-1])
        assert set(starts) <= set(batch["cu_seqlens"][:-1])
    small = [k - loader.offsets[1] for s, k, _ in rows if s == 1]
    epochs = [small[e * n_small:(e + 1) * n_small] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n_small))  # each sample once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation each epoch
    assert [e for s, _, e in rows if s == 1][:3 * n_small] == [e for e in range(3)
                                                                for _ in range(n_small)]


def by_position(batches_per_step, world, batch, start=0) -> dict:
    """{global position: (source, sample, epoch)} of lockstep batches of `world` ranks."""
    out = {}
    for t, step in enumerate(batches_per_step):
        for r, b in enumerate(step):
            for j, row in enumerate(drawn([b])):
                out[start + t * world * batch + r + world * j] = row
    return out


def test_mixture_resume_is_exact_under_the_same_and_another_world_size(two_sources):
    sources, _ = two_sources
    steps, stop = 12, 5
    full = [iter(mixture(sources, r, 2)) for r in range(2)]
    uninterrupted = [[next(it) for it in full] for _ in range(steps)]
    want = by_position(uninterrupted, world=2, batch=3)

    first = [mixture(sources, r, 2) for r in range(2)]
    first_iters = [iter(l) for l in first]
    for _ in range(stop):
        [next(it) for it in first_iters]
    state = json.loads(json.dumps(first[0].state_dict()))  # through JSON, as a checkpoint
    assert state == first[1].state_dict() and state["consumed"] == stop * 2 * 3

    same = [mixture(sources, r, 2) for r in range(2)]
    for l in same:
        l.load_state_dict(state)
    same_iters = [iter(l) for l in same]
    for step in uninterrupted[stop:]:
        for it, expected in zip(same_iters, step):
            got = next(it)
            for key in ("input_ids", "labels", "position_ids", "cu_seqlens", "sample_ids",
                        "source_ids", "epochs"):
                assert np.array_equal(got[key], expected[key]), key

    # 2 -> 3 ranks of 2 samples (6 a step, as before): every remaining global position holds
    # what it held in the uninterrupted run; none lost, none repeated
    three = [mixture(sources, r, 3, batch=2) for r in range(3)]
    for l in three:
        l.load_state_dict(state)
    three_iters = [iter(l) for l in three]
    resumed = [[next(it) for it in three_iters] for _ in range(steps - stop)]
    got = by_position(resumed, world=3, batch=2, start=state["consumed"])
    assert got == {p: row for p, row in want.items() if p >= state["consumed"]}

    changed = [SimpleNamespace(**{**vars(s), "weight": 0.5}) for s in sources]
    with pytest.raises(DataError, match="same sources, weights and data"):
        mixture(changed).load_state_dict(state)


def test_real_tokens_by_source_are_the_batches_real_tokens(two_sources):
    """The count metrics.jsonl logs (real_tokens_seen/<name>), computed from the order alone,
    equals the batches' own count of non-padding positions summed over ranks; padding (the
    short last window of each source, visited once per epoch) is not counted."""
    sources, streams = two_sources
    loaders = [mixture(sources, r, 2) for r in range(2)]
    iters = [iter(l) for l in loaders]
    want = np.zeros(2, np.int64)
    for _ in range(40):
        for it in iters:
            for s, k, _ in drawn([next(it)]):
                window = k - int(loaders[0].offsets[s])  # the source's own window number
                want[s] += min(16, len(streams[sources[s].name]) - 16 * window)
    consumed = loaders[0].consumed
    got = loaders[0].real_tokens_by_source(0, consumed)
    assert got.tolist() == want.tolist()
    samples = loaders[0].schedule.counts(consumed)
    assert samples[1] > 2 * loaders[0].sources[1].num_samples  # several epochs of the small one
    assert got[1] < samples[1] * 16  # so its padded last window came by, and is not counted


# ---- through the CLI --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, stdlib_data) -> Path:
    """A second small corpus (prose-like documents from the tests' generator), prepared with the
    embedded corpus's tokenizer and a validation split: 38 windows of 128 tokens."""
    root = tmp_path_factory.mktemp("small")
    write_jsonl(root / "docs.jsonl", [{"text": d} for d in TRICKY_DOCS + many_docs(12, seed=1)])
    res = run_cli("-m", "train.prepare", "--input", str(root / "docs.jsonl"), "--output",
                  str(root / "prose"), "--tokenizer", str(stdlib_data), "--val-fraction", "0.1",
                  "--no-progress")
    assert res.returncode == 0, res.stderr
    return root / "prose"


def mixture_args(*entries: str) -> list[str]:
    return ["data.path=null", f"data.mixture=[{', '.join(entries)}]"]


def with_index(src: Path, dst: Path, edit) -> Path:
    """A copy of a prepared directory with its index.json edited."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / "index.json").read_text())
    edit(raw)
    (dst / "index.json").write_text(json.dumps(raw))
    return dst


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize("case,entries,extra,expected", [
    ("negative weight", ["{path: S, weight: 1}", "{path: P, weight: -0.5}"], [],
     ["data.mixture[1].weight must be a finite number >= 0, got -0.5"]),
    ("all weights zero", ["{path: S, weight: 0}", "{path: P, weight: 0}"], [],
     ["every weight is 0"]),
    ("no weight", ["{path: S, weight: 1}", "{path: P}"], [], ["data.mixture[1] has no weight"]),
    ("missing directory", ["{path: S, weight: 1}", "{path: /nonexistent/prose, weight: 1}"], [],
     ["data.mixture[1] (prose): data directory /nonexistent/prose does not exist"]),
    ("another tokenizer", ["{path: S, weight: 1}", "{path: OTHER_TOKENIZER, weight: 1}"], [],
     ["data.mixture[1] (other_tokenizer) was tokenized with another tokenizer than "
      "data.mixture[0]", "same --tokenizer"]),
    ("no train split", ["{path: S, weight: 1}", "{path: NO_TRAIN, weight: 1}"], [],
     ["data.mixture[1] (no_train):", "has no 'train' split"]),
    ("task mismatch", ["{path: S, weight: 1}", "{path: MLM, weight: 1}"], [],
     ["data.mixture[1] (mlm):", "prepared with --task mlm"]),
    ("capped source runs out", ["{path: S, weight: 0.5}", "{path: P, weight: 0.5, max_epochs: 1}"],
     ["max_steps=40", "per_device_train_batch_size=4"],
     ["data.mixture[1] (prose) runs out: 160 samples in the run x its share 0.5 = 80 samples",
      "but it has 38 samples of 128 tokens x max_epochs 1 = 38", "raise its max_epochs to 3"]),
    ("both path and mixture", ["{path: S, weight: 1}"], ["data.path=S"],
     ["data.path and data.mixture are both set"]),
    ("no max_steps", ["{path: S, weight: 1}"], ["max_steps=-1"],
     ["data.mixture needs max_steps"]),
    ("same name twice", ["{path: P, weight: 1}", "{path: P, weight: 1}"], [],
     ["data.mixture names prose more than once", "give those entries distinct names"]),
    ("unknown entry key", ["{path: S, weight: 1, epochs: 2}"], [],
     ["unknown config key data.mixture[0].epochs", "max_epochs"]),
])
def test_bad_mixture_is_one_line_and_exit_2(stdlib_data, small_corpus, tmp_path, case, entries,
                                            extra, expected):
    from train.__main__ import main

    paths = {"S": stdlib_data, "P": small_corpus,
             "OTHER_TOKENIZER": tmp_path / "other_tokenizer", "NO_TRAIN": tmp_path / "no_train",
             "MLM": tmp_path / "mlm"}
    if case == "another tokenizer":
        with_index(small_corpus, paths["OTHER_TOKENIZER"],
                   lambda raw: raw.update(tokenizer_sha256="0" * 64))
    if case == "no train split":
        with_index(small_corpus, paths["NO_TRAIN"], lambda raw: raw["splits"].pop("train"))
    if case == "task mismatch":
        with_index(small_corpus, paths["MLM"], lambda raw: raw.update(task="mlm"))

    def fill(text):
        for key, path in paths.items():
            text = text.replace(f"path: {key}", f"path: {path}").replace(f"path={key}", f"path={path}")
        return text

    err = io.StringIO()
    with redirect_stderr(err):
        code = main([TINY, f"output_dir={tmp_path / 'o'}", *mixture_args(*map(fill, entries)),
                     *map(fill, extra)])
    assert code == 2, err.getvalue()
    line = one_error_line(err.getvalue())
    for fragment in expected:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_the_processes_refuse_before_starting_or_queueing(stdlib_data, small_corpus, tmp_path):
    """The same preflight in a real `python -m train` and in the launcher (before it submits)."""
    bad = mixture_args(f"{{path: {stdlib_data}, weight: 0.9}}",
                       f"{{path: {small_corpus}, weight: 0.1, max_epochs: 1}}")
    for command in (["-m", "train"], ["-m", "launcher", "--nodes", "2", "--dry-run"]):
        res = run_cli(*command, TINY, f"output_dir={tmp_path / 'o'}", *bad, "max_steps=1000")
        assert res.returncode == 2, res.stderr
        assert "data.mixture[1] (prose) runs out" in one_error_line(res.stderr)
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_ranks_train_on_a_mixture_with_per_source_eval_and_resume(stdlib_data, small_corpus,
                                                                     tmp_path):
    """The embedded corpus 1:1 with the small corpus (38 samples, so it starts a second epoch), 2 ranks, stopped after step 6 (checkpoint
    and exit) and resumed under 1 rank with the same global batch: per-source eval and token
    counts in metrics.jsonl, the realized mixture in the summary, and the resumed run's samples
    those of the uninterrupted order (its per-source token counts are that order's)."""
    out = tmp_path / "run"
    sources = [SimpleNamespace(path=stdlib_data, weight=1, name="stdlib"),
               SimpleNamespace(path=small_corpus, weight=1, name="prose")]
    common = [TINY, f"output_dir={out}", "max_steps=12", "logging_steps=3", "eval_steps=6",
              "eval_max_batches=2", "save_steps=100", *mixture_args(
                  f"{{path: {stdlib_data}, weight: 1, name: stdlib}}",
                  f"{{path: {small_corpus}, weight: 1, max_epochs: 2, name: prose}}")]
    res = run_train(*common, "per_device_train_batch_size=4",
                    env={"TRAIN_EXIT_AFTER_STEPS": "6"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000006").exists() and not (out / "final").exists()
    res = run_train(*common, "per_device_train_batch_size=8", nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "saved by 2 ranks, now 1" in res.stderr

    records = read_metrics(out)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    for r in evals:
        for name in ("stdlib", "prose"):
            assert r[f"perplexity/{name}"] == pytest.approx(np.exp(r[f"eval_loss/{name}"]))
        # the plain eval_loss is the token-weighted total of the sources'
        total = sum(r[f"eval_loss/{n}"] * r[f"eval_tokens/{n}"] for n in ("stdlib", "prose"))
        assert r["eval_loss"] == pytest.approx(total / r["eval_tokens"], rel=1e-12)
        assert r["eval_tokens"] == r["eval_tokens/stdlib"] + r["eval_tokens/prose"]

    # Real tokens per source, against the uninterrupted global order of 12 x 8 samples counted
    # here from the shards' sizes: a lost or repeated sample, or counted padding, changes them.
    order = mixture_order(sources, 12 * 8)
    sizes = [json.loads((Path(s.path) / "index.json").read_text())["splits"]["train"]["num_tokens"]
             for s in sources]
    want = [sum(min(128, sizes[s] - 128 * k) for s2, k in order if s2 == s) for s in (0, 1)]
    last = [r for r in records if "loss" in r][-1]
    assert [last["real_tokens_seen/stdlib"], last["real_tokens_seen/prose"]] == want
    assert last["real_tokens_seen"] == sum(want) < 12 * 8 * 128  # the prose's padding: 2 epochs
    assert sum(1 for s, _ in order if s == 1) == 48  # half of the samples: 38 + 10
    assert f"{sum(want):,} real tokens (stdlib {want[0] / sum(want):.1%}, prose " in res.stderr


def mixture_order(sources, n: int) -> list[tuple[int, int]]:
    """(source, window within the source) of the first n global positions, seed 42."""
    loader = MixtureLoader(sources, seq_len=128, micro_batch_size=n, seed=42, verify="none")
    batch = loader.batch_at(np.arange(n))
    return [(int(s), int(k - loader.offsets[s])) for s, k in zip(batch["source_ids"],
                                                                batch["sample_ids"])]


def test_max_epochs_arithmetic_counts_a_resumed_runs_samples_under_its_new_world_size(
        stdlib_data, small_corpus, tmp_path):
    """Resuming: the samples drawn so far (the checkpoint's loader position) plus the remaining
    steps at the new world size's global batch; a cap that the first world size kept but the
    new batch exceeds is refused before the job starts."""
    from train.config import load_config
    from train.errors import UsageError
    from train.run.preflight import preflight

    saved = tmp_path / "o" / "checkpoints" / "step-00000010"
    saved.mkdir(parents=True)
    # 10 steps of 1 rank x 4 samples drawn so far
    (saved / "trainer_state.json").write_text(json.dumps(
        {"step": 10, "world_size": 1, "loader": {"consumed": 40}}))
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'o'}", "max_steps=30",
                             "per_device_train_batch_size=4", *mixture_args(
                                 f"{{path: {stdlib_data}, weight: 1}}",
                                 f"{{path: {small_corpus}, weight: 1, max_epochs: 2}}")])
    preflight(cfg, 1)  # 40 + 20 x 4 = 120 samples, 60 of the prose: within 2 x 38
    with pytest.raises(UsageError, match=r"200 samples in the run x its share 0.5 = 100 samples"
                                         r".* raise its max_epochs to 3"):
        preflight(cfg, 2)  # 40 + 20 x 8 = 200 samples: 100 of the prose
    cfg.data.mixture[1].max_epochs = 1
    with pytest.raises(UsageError, match=r"120 samples in the run .* raise its max_epochs to 2"):
        preflight(cfg, 1)


def test_resuming_with_another_mixture_is_config_drift_and_older_checkpoints_still_resume():
    """data.mixture decides the sample order: a changed weight is refused on resume by key (as
    any math change); a checkpoint from before data.mixture existed lacks the key, which is no
    change when the run leaves it null."""
    from train.run import config_drift
    from train.config import load_config

    mixed = load_config(TINY, mixture_args("{path: a, weight: 0.7}", "{path: b, weight: 0.3}"))
    reweighted = load_config(TINY, mixture_args("{path: a, weight: 0.5}", "{path: b, weight: 0.5}"))
    found = config_drift.changes(mixed.to_dict(), reweighted.to_dict(), 1, 1)
    assert [key for key, _, _ in found] == ["data.mixture"]
    single = load_config(TINY).to_dict()
    older = {**single, "data": {k: v for k, v in single["data"].items() if k != "mixture"}}
    assert config_drift.changes(older, single, 1, 1) == []
