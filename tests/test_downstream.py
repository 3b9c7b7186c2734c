"""eval_harness (train/run/downstream.py): the offline task, the inline eval of each saved
checkpoint in a 2-rank run, checked against the lm_eval command line on the exported model; and
the run's figure (train/run/figure.py) drawn from that run's metrics."""
from __future__ import annotations

import json

import pytest

from helpers import TINY, read_metrics, run_cli, run_train
from train.config import EvalHarnessSection, load_config
from train.errors import UsageError
from train.run import downstream


OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_next_line_examples_pick_the_line_that_follows():
    docs = [f"def f{d}():\n" + "".join(f"    x{d}_{i} = {i}\n" for i in range(20))
            for d in range(5)]
    examples = downstream.next_line_examples(docs, seed=3)
    assert examples == downstream.next_line_examples(docs, seed=3)  # deterministic
    assert len(examples) == 5 * 2  # lines 3 and 15 of each 21-line document
    for e in examples:
        context = e["context"].splitlines()
        assert len(context) == downstream.CONTEXT_LINES
        doc = next(d.splitlines() for d in docs if e["context"] in d)
        true = doc[doc.index(context[-1]) + 1]
        assert e["choices"][e["gold"]] == true
        assert len(set(e["choices"])) == downstream.CHOICES
        assert all(c not in doc for i, c in enumerate(e["choices"]) if i != e["gold"])


def test_downstream_fields_name_task_and_metric():
    results = {"stdlib_next_line": {"alias": "stdlib_next_line", "sample_len": 16,
                                    "acc,none": 0.25, "acc_stderr,none": "N/A",
                                    "acc_norm,none": 0.5, "exact_match,strict": 0.75}}
    assert downstream.downstream_fields(results) == {
        "downstream/stdlib_next_line/acc": 0.25, "downstream/stdlib_next_line/acc_norm": 0.5,
        "downstream/stdlib_next_line/exact_match_strict": 0.75}


@pytest.mark.parametrize("every,steps", [(None, [4, 8, 12]), (8, [8])])
def test_every_saved_checkpoint_or_every_n_steps(every, steps):
    section = EvalHarnessSection(tasks=["stdlib_next_line"], every=every)
    assert [s for s in (4, 8, 12) if downstream.due(section, s)] == steps
    assert not downstream.due(EvalHarnessSection(), 4)  # no tasks: off


@pytest.mark.parametrize("overrides,message", [
    (["eval_harness.tasks=[]"], "eval_harness.tasks is empty"),
    (["eval_harness.tasks=[/nowhere/task.yaml]"], "eval_harness.tasks: /nowhere/task.yaml does "
                                                   "not exist"),
    (["eval_harness.tasks=[stdlib_next_line]", "lm_eval=missing"],
     "eval_harness needs lm-evaluation-harness, which is not installed; pip install "
     "'slurm-lm[eval]'"),
])
def test_preflight_refuses_an_eval_harness_it_cannot_run(stdlib_data, tmp_path, monkeypatch,
                                                        overrides, message):
    import importlib.util

    from train.run.preflight import preflight

    if "lm_eval=missing" in overrides:
        overrides.remove("lm_eval=missing")
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "lm_eval" else real(name, *a))
    cfg = load_config(TINY, [f"data.path={stdlib_data}", f"output_dir={tmp_path}/run",
                             *overrides])
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        preflight(cfg, 1)


@pytest.mark.slow
def test_two_ranks_evaluate_each_checkpoint_as_lm_eval_does_and_plot_it(stdlib_data, tmp_path):
    out = tmp_path / "run"
    limit = 16
    res = run_train(TINY, f"data.path={stdlib_data}", f"output_dir={out}", "max_steps=4",
                    "per_device_train_batch_size=2", "logging_steps=2", "eval_steps=2",
                    "save_steps=2", "eval_max_batches=2", "eval_harness.tasks=[stdlib_next_line]",
                    "eval_harness.every=4", f"eval_harness.limit={limit}", env=OFFLINE)
    assert res.returncode == 0, res.stderr[-3000:]
    # saved at steps 2 and 4; evaluated at 4 only (every: 4); the temporary export is gone
    assert sorted(p.name for p in (out / "evals").iterdir()) == ["step-4.json", "tasks"]
    ours = json.loads((out / "evals" / "step-4.json").read_text())["results"]
    # the real tool on the export of the same weights (final/ is step 4's)
    cli = tmp_path / "cli"
    ran = run_cli("-m", "lm_eval", "--model", "hf", "--model_args",
                  f"pretrained={out / 'final'}", "--tasks", "stdlib_next_line",
                  "--include_path", str(out / "evals" / "tasks"), "--limit", str(limit),
                  "--batch_size", "8", "--device", "cpu",
                  "--output_path", str(cli), env=OFFLINE, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    theirs = json.loads(next(cli.rglob("results_*.json")).read_text())["results"]
    task = "stdlib_next_line"
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[task][metric] == theirs[task][metric], metric  # same model, same requests
    assert ours[task]["sample_len"] == theirs[task]["sample_len"] == limit
    record = [r for r in read_metrics(out) if any(k.startswith("downstream/") for k in r)]
    assert record == [{"step": 4, f"downstream/{task}/acc": ours[task]["acc,none"],
                       f"downstream/{task}/acc_norm": ours[task]["acc_norm,none"]}]

    # the run's figure, drawn from its metrics.jsonl, overlaid with itself under another name
    from train.run.figure import draw, run_records

    fig = draw({"a": run_records(out), "b": run_records(out)})
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["loss", "eval perplexity", "learning rate", "throughput",
                          f"downstream {task}/acc", f"downstream {task}/acc_norm"]
    assert len(axes["loss"].get_lines()) == 4  # train and eval of each run
    assert [t.get_text() for t in axes["loss"].get_legend().get_texts()] == \
        ["a train", "a eval", "b train", "b eval"]
    assert axes["eval perplexity"].get_yscale() == "log"
    assert len(axes[f"downstream {task}/acc"].get_lines()) == 2
    assert (out / "metrics.png").stat().st_size > 10_000  # the end of the run drew its own
