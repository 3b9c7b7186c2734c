"""What differs between the three tasks, and nothing else: which Hugging Face head, how a packed
batch gets its labels, and what eval reports beyond the loss.

  clm                   next-token labels straight from the loader (AutoModelForCausalLM)
  mlm                   80/10/10 masking at batch time, optionally of whole words, fixed for
                        eval (AutoModelForMaskedLM); see train/masking.py
  token-classification  labels from the label stream that prepare wrote beside the tokens,
                        aligned to sub-tokens as configured; windows hold whole sentences; eval
                        adds seqeval's entity precision, recall, F1 and token accuracy
                        (AutoModelForTokenClassification)

The loader, the model wrapper, the kernels, the engine, checkpoints and export are shared.
"""
from __future__ import annotations

import numpy as np

from train.errors import DataError
from train.loader import IGNORE_INDEX
from train.shards import ShardIndex


class CausalLM:
    name = "clm"
    auto_class = "AutoModelForCausalLM"
    loader_options: dict = {}
    reports_entities = False

    def __init__(self, cfg, index: ShardIndex):
        self.cfg = cfg

    def model_kwargs(self) -> dict:
        """Extra config values for a model built or loaded for this task."""
        return {}

    def train_batch(self, batch: dict) -> dict:
        return batch

    def eval_batch(self, batch: dict) -> dict:
        return self.train_batch(batch)  # eval batches carry epoch 0: fixed masking for MLM


class MaskedLM(CausalLM):
    name = "mlm"
    auto_class = "AutoModelForMaskedLM"

    def __init__(self, cfg, index: ShardIndex):
        super().__init__(cfg, index)
        from train.masking import VocabularyTables

        self.tables = VocabularyTables.from_tokenizer(
            index.root, index.vocab_size, index.special_ids.get("mask_token"))

    def train_batch(self, batch: dict) -> dict:
        from train.masking import mask_tokens

        masked, labels = mask_tokens(batch["input_ids"], batch["position_ids"],
                                     batch["sample_ids"], batch["epochs"], self.tables,
                                     probability=self.cfg.data.mlm_probability,
                                     whole_word=self.cfg.data.whole_word_masking,
                                     seed=self.cfg.seed)
        return {**batch, "input_ids": masked, "labels": labels}


class TokenClassification(CausalLM):
    name = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    # A sentence is never cut by a window edge (unless it is longer than the window): entity
    # metrics need whole sentences, and the model should see each sentence's context.
    loader_options = {"whole_documents": True, "label_codes": True}
    reports_entities = True

    def __init__(self, cfg, index: ShardIndex):
        super().__init__(cfg, index)
        from train.ner_data import continuation_label

        self.names = index.label_names
        if not self.names:
            raise DataError(f"{index.root} has no label set: prepare it with --task "
                            f"token-classification")
        label_ids = {name: i for i, name in enumerate(self.names)}
        # continuation sub-tokens: B-X -> I-X (label_all_tokens), or ignored
        self.continuation = np.array([label_ids.get(continuation_label(n), i)
                                      for i, n in enumerate(self.names)])

    def model_kwargs(self) -> dict:
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)),
                "label2id": {n: i for i, n in enumerate(self.names)}}

    def train_batch(self, batch: dict) -> dict:
        codes = batch["label_codes"]
        label, continues = codes >> 1, (codes & 1).astype(bool)
        if self.cfg.data.label_all_tokens:
            on_continuation = self.continuation[np.maximum(label, 0)]
        else:
            on_continuation = np.full_like(label, IGNORE_INDEX)
        labels = np.where(codes < 0, IGNORE_INDEX, np.where(continues, on_continuation, label))
        return {**batch, "labels": labels}

    def update_entities(self, counter, batch: dict, predicted: np.ndarray) -> None:
        """Add one eval batch to an EntityCounter: word-level tags (a word's first sub-token),
        sentence by sentence (the attention segments)."""
        labels = batch["labels"].reshape(-1)
        labelled = labels != IGNORE_INDEX
        codes = batch["label_codes"].reshape(-1)[labelled]
        first = (codes >= 0) & (codes % 2 == 0)
        segment = np.searchsorted(batch["cu_seqlens"], np.flatnonzero(labelled), side="right")
        true, pred, segment = labels[labelled][first], predicted[first], segment[first]
        for s in np.unique(segment):
            at = segment == s
            counter.update([self.names[i] for i in true[at]], [self.names[i] for i in pred[at]])


def eval_record(loss_sum: float, tokens: int, entity_counts: list[int] | None = None) -> dict:
    """What an eval reports: eval_loss (mean nats per labelled token) and perplexity, or, for a
    token classifier, seqeval's entity precision, recall, F1 and token accuracy."""
    import math

    from train.ner_metrics import EntityCounter

    loss = loss_sum / max(tokens, 1)
    record = {"eval_loss": loss, "eval_tokens": int(tokens)}
    if entity_counts is None:
        record["perplexity"] = math.exp(min(loss, 700))
    else:
        scores = EntityCounter.scores([int(c) for c in entity_counts])
        record.update({f"eval_{k}": scores[k] for k in ("precision", "recall", "f1", "accuracy")})
    return record


TASKS = {task.name: task for task in (CausalLM, MaskedLM, TokenClassification)}


def make_task(cfg, index: ShardIndex):
    return TASKS[cfg.task](cfg, index)
