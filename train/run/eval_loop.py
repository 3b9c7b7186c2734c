"""One eval loop, used by the run (every eval_steps) and by `python -m train.evaluate`.

eval_loss is the token average of the loss over the split's labelled tokens; the task turns the
sums into its metrics (perplexity = exp(eval_loss), or entity precision, recall, F1 and token
accuracy for token classification). Every rank runs the same number of forwards (ZeRO-3 gathers
parameters collectively): a rank with fewer batches repeats its last one with every label
ignored, which adds nothing. A mixture is evaluated source by source (`eval_metrics_by_source`):
each source's metrics under `<metric>/<name>`, and the plain names over all their tokens together.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import torch

from train.data.loader import IGNORE_INDEX, PackedLoader


def eval_metrics(forward: Callable, loader: PackedLoader, task, *, max_batches: int | None = None,
             world: int = 1, all_reduce: Callable | None = None, device=None) -> dict:
    """forward(batch, return_predictions) -> (loss sum, labelled tokens[, predicted classes]);
    all_reduce(tensor) sums over ranks (None: one process)."""
    return task.eval_record(*eval_sums(forward, loader, task, max_batches=max_batches,
                                       world=world, all_reduce=all_reduce, device=device))


def eval_metrics_by_source(forward: Callable, loaders: dict, task, **options) -> dict:
    """A mixture's eval: each source's metrics under `<metric>/<name>` (eval_loss/code,
    perplexity/code, ...) and, under the plain names, the metrics of all their tokens together
    (the token-weighted total). loaders: {name: PackedLoader of that source's split}."""
    record, totals = {}, None
    for name, loader in loaders.items():
        sums = eval_sums(forward, loader, task, **options)
        record.update({f"{key}/{name}": value for key, value in task.eval_record(*sums).items()})
        totals = sums if totals is None else (
            totals[0] + sums[0], totals[1] + sums[1], [a + b for a, b in zip(totals[2], sums[2])])
    return {**task.eval_record(*totals), **record}


@torch.no_grad()
def eval_sums(forward: Callable, loader: PackedLoader, task, *, max_batches: int | None = None,
              world: int = 1, all_reduce: Callable | None = None,
              device=None) -> tuple[float, int, list]:
    """(loss sum, labelled tokens, the task's additive counts) of one split, over all ranks."""
    per_rank = math.ceil(math.ceil(loader.num_samples / world) / loader.micro_batch_size)
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    # only the batches this eval uses are built (and masked)
    mine = [task.eval_batch(b) for b in itertools.islice(loader.one_pass(), per_rank)]
    total = torch.zeros(2, device=device, dtype=torch.float64)  # [loss sum, tokens]
    counts = None  # the task's additive counts
    for i in range(per_rank):
        if i < len(mine):
            batch = mine[i]
        else:
            batch = dict(mine[-1] if mine else task.eval_batch(loader.batch(np.array([0]))))
            batch["labels"] = np.full_like(batch["labels"], IGNORE_INDEX)
        loss_sum, tokens, *predicted = forward(batch, task.wants_predictions)
        total += torch.stack([loss_sum.double(), tokens.double()])
        batch_counts = np.asarray(task.eval_counts(
            batch, predicted[0].cpu().numpy() if predicted else None), dtype=np.float64)
        counts = batch_counts if counts is None else counts + batch_counts
    counts = torch.as_tensor(counts if counts is not None else [], device=device,
                             dtype=torch.float64)
    if all_reduce is not None:
        all_reduce(total)
        if counts.numel():
            all_reduce(counts)
    return total[0].item(), int(total[1].item()), counts.tolist()
