"""Downstream evals of the saved checkpoints with EleutherAI's lm-evaluation-harness
(the `eval_harness:` section), inline: after a checkpoint's save, on rank 0.

The weights are exported as train/run/export.py exports final/ (the same conversion, from the
engine that just saved them: the checkpoint itself is never read or touched) into
output_dir/evals/.model-step-N, the harness runs on that directory through its Python API with
its Hugging Face model class (HFLM), the results go to output_dir/evals/step-N.json, and their
numbers to metrics.jsonl, the trackers and the plot as `downstream/<task>/<metric>` at step N.

Tasks are lm-eval task names (hub tasks need a network), paths of local task YAMLs, or
`stdlib_next_line`, the offline task shipped here: multiple choice over the run's own
validation split (held out from training), decoded back to text: given a few lines of a
document, which of four lines comes next (the true one, or a line of another document).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

from train.config import EvalHarnessSection
from train.data.shards import ShardIndex
from train.errors import warn

LOCAL_TASK = "stdlib_next_line"
EVALS = "evals"
CONTEXT_LINES = 3   # the lines shown before the one to pick; short enough for a tiny model's
CHOICES = 4         # positions (tiny-clm: 128 tokens)
MAX_LINE_CHARS = 80
MAX_EXAMPLES = 1000

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def due(section: EvalHarnessSection, step: int) -> bool:
    """Is the checkpoint of `step` evaluated? Every saved one, or those at multiples of every."""
    return bool(section.tasks) and (section.every is None or step % section.every == 0)


def validation_documents(data_dir: Path) -> list[str]:
    """The validation split's documents as text: its tokens cut at EOS and decoded."""
    from tokenizers import Tokenizer

    index = ShardIndex.load(data_dir)
    tokenizer = Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json"))
    docs = []
    for shard in index.shards("validation"):
        tokens = np.fromfile(Path(data_dir) / shard.file, dtype=index.dtype)
        ends = np.flatnonzero(tokens == index.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        docs += tokenizer.decode_batch([tokens[a:b].tolist() for a, b in zip(starts, ends)])
    return docs


def next_line_examples(docs: list[str], seed: int = 0) -> list[dict]:
    """Multiple-choice examples: CONTEXT_LINES lines of a document, the line that follows and
    CHOICES - 1 lines of other documents, in a seeded order."""
    rng = random.Random(seed)
    lines = [[l for l in doc.splitlines() if l.strip() and len(l) <= MAX_LINE_CHARS]
             for doc in docs]
    pool = [(i, l) for i, doc in enumerate(lines) for l in doc]
    examples = []
    for i, doc in enumerate(lines):
        for at in range(CONTEXT_LINES, len(doc), 4 * CONTEXT_LINES):  # windows apart
            true = doc[at]
            others = set()
            while len(others) < CHOICES - 1:
                j, line = pool[rng.randrange(len(pool))]
                if j != i and line != true:
                    others.add(line)
            choices = [true, *sorted(others)]
            rng.shuffle(choices)
            examples.append({"context": "\n".join(doc[at - CONTEXT_LINES:at]) + "\n",
                             "choices": choices, "gold": choices.index(true)})
    rng.shuffle(examples)
    return examples[:MAX_EXAMPLES]


def build_local_task(data_dir: Path, dest: Path) -> Path:
    """Write the offline task (its JSONL and its lm-eval YAML) into dest; returns dest, the
    directory to give the harness as include_path."""
    dest.mkdir(parents=True, exist_ok=True)
    data = dest / f"{LOCAL_TASK}.jsonl"
    data.write_text("".join(json.dumps(e) + "\n"
                            for e in next_line_examples(validation_documents(data_dir))))
    (dest / f"{LOCAL_TASK}.yaml").write_text(TASK_YAML.format(name=LOCAL_TASK,
                                                              data=json.dumps(str(data))))
    return dest


def task_names(section: EvalHarnessSection, include: Path) -> tuple[list[str], list[str]]:
    """(task names for the harness, directories of local task YAMLs to include)."""
    names, paths = [], []
    for task in section.tasks:
        if task == LOCAL_TASK:
            names.append(task)
            paths.append(str(include))
        elif task.endswith((".yaml", ".yml")):
            import yaml

            names.append(yaml.safe_load(Path(task).read_text())["task"])
            paths.append(str(Path(task).resolve().parent))
        else:
            names.append(task)
    return names, paths


def run_harness(model_dir: Path, section: EvalHarnessSection, include: Path,
                device: str = "cpu") -> dict:
    """lm_eval.simple_evaluate with HFLM on the exported directory: its `results` by task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names, paths = task_names(section, include)
    model = HFLM(pretrained=str(model_dir), batch_size=section.batch_size, device=device)
    out = simple_evaluate(model=model, tasks=names, limit=section.limit,
                          task_manager=TaskManager(include_path=paths or None),
                          log_samples=False, bootstrap_iters=0)
    return out["results"]


def downstream_fields(results: dict) -> dict[str, float]:
    """{downstream/<task>/<metric>: value} of the harness's results (its "acc,none" is the
    metric acc under no filter; a named filter stays in the name)."""
    fields = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if not comma or not isinstance(value, (int, float)) or "_stderr" in metric:
                continue  # the task's name, alias, sample count; or a standard error
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            fields[f"downstream/{task}/{name}"] = float(value)
    return fields


def write_results(out: Path, step: int, results: dict) -> Path:
    """output_dir/evals/step-N.json, written whole (temporary name, rename)."""
    path = out / EVALS / f"step-{step}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "results": results}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def evaluate_export(model_dir: Path, out: Path, step: int, section: EvalHarnessSection,
                    data_dir: Path, device: str = "cpu") -> dict:
    """The harness on an exported model directory: evals/step-N.json written, and the metrics
    record of step N returned. Inline on rank 0, or in an eval job (python -m train.eval_job)."""
    evals = out / EVALS
    include = build_local_task(data_dir, evals / "tasks") if LOCAL_TASK in section.tasks \
        else evals / "tasks"
    results = run_harness(model_dir, section, include, device)
    write_results(out, step, results)
    return {"step": step, **downstream_fields(results)}


def model_dir_of(out: Path, step: int) -> Path:
    """Where the weights of step N are exported for its eval."""
    return out / EVALS / f".model-step-{step}"


def evaluate_checkpoint(export, out: Path, step: int, section: EvalHarnessSection,
                        data_dir: Path, rank: int, device: str = "cpu") -> dict | None:
    """Inline: every rank exports the weights (a collective under ZeRO-3), rank 0 runs the
    harness and writes evals/step-N.json. Returns rank 0's metrics record, None elsewhere.
    export(dir) writes the weights as export_final does."""
    (out / EVALS).mkdir(parents=True, exist_ok=True)
    model_dir = model_dir_of(out, step)
    export(model_dir)
    if rank != 0:
        return None
    try:
        return evaluate_export(model_dir, out, step, section, data_dir, device)
    except Exception as err:  # a failed eval is reported; training and its checkpoint go on
        first_line = (str(err).splitlines() or [""])[0][:300]
        warn(f"eval_harness on the checkpoint of step {step} failed: "
             f"{type(err).__name__}: {first_line}; training goes on")
        return None
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
