"""What differs between the four tasks, and nothing else, behind one small interface (`Task`):
which Hugging Face head, which labels a packed batch gets, and what eval reports.

  clm                   next-token labels, built by the loader (AutoModelForCausalLM)
  mlm                   80/10/10 masking at batch time, optionally of whole words, fixed for
                        eval (AutoModelForMaskedLM); see train/data/masking.py
  token-classification  labels from the label stream that prepare wrote beside the tokens,
                        aligned to sub-tokens as configured; windows hold whole sentences; eval
                        adds seqeval's entity precision, recall, F1 and token accuracy
                        (AutoModelForTokenClassification)
  sft                   chat fine-tuning: next-token labels on the tokens the mask codes mark
                        (those whose next token is the assistant's, train/data/chat.py), the
                        rest ignored; windows hold whole conversations (AutoModelForCausalLM);
                        eval_loss and perplexity are over assistant tokens only

The loader, the model wrapper, the kernels, the engine, the eval loop (train/run/eval_loop.py),
checkpoints and export are shared, and none of them asks which task it runs.
"""
from __future__ import annotations

import math

import numpy as np

from train.errors import DataError
from train.data.loader import IGNORE_INDEX
from train.data.shards import ShardIndex


class Task:
    """The interface every task implements; the defaults are a causal LM's.

    name, auto_class      the config's `task` value; the transformers Auto class of its head
    loader_options()      keyword arguments for PackedLoader (a fresh dict each call)
    model_kwargs()        extra config values for a model built or loaded for this task
    train_batch(batch)    a loader batch -> the same batch with its `labels`
    eval_batch(batch)     the same for eval (fixed masking for MLM)
    wants_predictions     whether eval needs each labelled token's predicted class
    eval_counts(batch, predicted)   additive counts (summed over batches and ranks) for ...
    eval_record(loss_sum, tokens, counts)   ... the metrics an eval reports
    headline_metric       the eval metric a run's summary line reports
    """

    name = "clm"
    auto_class = "AutoModelForCausalLM"
    wants_predictions = False
    headline_metric = "perplexity"  # the eval metric the run's summary line follows

    def __init__(self, cfg, index: ShardIndex):
        self.cfg = cfg

    def loader_options(self) -> dict:
        return {}

    def model_kwargs(self) -> dict:
        return {}

    def train_batch(self, batch: dict) -> dict:
        return batch

    def eval_batch(self, batch: dict) -> dict:
        return self.train_batch(batch)  # eval batches carry epoch 0: fixed masking for MLM

    def eval_counts(self, batch: dict, predicted: np.ndarray | None) -> list[int]:
        return []

    def eval_record(self, loss_sum: float, tokens: int, counts: list[float]) -> dict:
        """eval_loss (mean nats per labelled token) and perplexity."""
        loss = loss_sum / max(tokens, 1)
        return {"eval_loss": loss, "eval_tokens": int(tokens),
                "perplexity": math.exp(min(loss, 700))}


class CausalLM(Task):
    """Next-token prediction: the loader's labels as they are."""


class MaskedLM(Task):
    name = "mlm"
    auto_class = "AutoModelForMaskedLM"

    def __init__(self, cfg, index: ShardIndex):
        super().__init__(cfg, index)
        from train.data.masking import VocabularyTables

        self.tables = VocabularyTables.from_tokenizer(
            index.root, index.vocab_size, index.special_ids.get("mask_token"))

    def loader_options(self) -> dict:
        return {"next_token_labels": False}  # the masking makes the labels

    def train_batch(self, batch: dict) -> dict:
        from train.data.masking import mask_tokens

        masked, labels = mask_tokens(batch["input_ids"], batch["position_ids"],
                                     batch["sample_ids"], batch["epochs"], self.tables,
                                     probability=self.cfg.data.mlm_probability,
                                     whole_word=self.cfg.data.whole_word_masking,
                                     seed=self.cfg.seed)
        return {**batch, "input_ids": masked, "labels": labels}


class TokenClassification(Task):
    name = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    wants_predictions = True
    headline_metric = "eval_f1"

    def __init__(self, cfg, index: ShardIndex):
        super().__init__(cfg, index)
        from train.data.ner_data import continuation_label

        self.names = index.label_names
        label_ids = {name: i for i, name in enumerate(self.names)}
        # continuation sub-tokens: B-X -> I-X (label_all_tokens), or ignored
        self.continuation = np.array([label_ids.get(continuation_label(n), i)
                                      for i, n in enumerate(self.names)])

    def loader_options(self) -> dict:
        # A sentence is never cut by a window edge (unless it is longer than the window): entity
        # metrics need whole sentences, and the model should see each sentence's context. The
        # labels come from the label stream, not from the next token.
        return {"whole_documents": True, "label_codes": True, "next_token_labels": False}

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

    def eval_counts(self, batch: dict, predicted: np.ndarray | None) -> list[int]:
        """EntityCounter's counts for one eval batch: word-level tags (a word's first sub-token),
        sentence by sentence (the attention segments)."""
        from train.ner_metrics import EntityCounter

        counter = EntityCounter()
        labels = batch["labels"].reshape(-1)
        labelled = labels != IGNORE_INDEX
        codes = batch["label_codes"].reshape(-1)[labelled]
        first = (codes >= 0) & (codes % 2 == 0)
        segment = np.searchsorted(batch["cu_seqlens"], np.flatnonzero(labelled), side="right")
        true, pred, segment = labels[labelled][first], predicted[first], segment[first]
        for s in np.unique(segment):
            at = segment == s
            counter.update([self.names[i] for i in true[at]], [self.names[i] for i in pred[at]])
        return counter.counts()

    def eval_record(self, loss_sum: float, tokens: int, counts: list[float]) -> dict:
        """eval_loss, and seqeval's entity precision, recall, F1 and token accuracy."""
        from train.ner_metrics import EntityCounter

        if not counts:  # no eval batch at all
            counts = EntityCounter().counts()
        scores = EntityCounter.scores([int(c) for c in counts])
        return {"eval_loss": loss_sum / max(tokens, 1), "eval_tokens": int(tokens),
                **{f"eval_{k}": scores[k] for k in ("precision", "recall", "f1", "accuracy")}}


class ChatSFT(Task):
    name = "sft"

    def __init__(self, cfg, index: ShardIndex):
        super().__init__(cfg, index)
        longest = int(((index.chat or {}).get("counts") or {}).get("max_conversation_tokens", 0))
        if longest > cfg.data.seq_len:
            # a window holds whole conversations: a longer one would be cut, and the token
            # before the cut trained on a target in another window
            raise DataError(f"{index.root} holds conversations of up to {longest} tokens, more "
                            f"than data.seq_len {cfg.data.seq_len}: raise data.seq_len, or "
                            f"prepare again with --max-length {cfg.data.seq_len}")

    def loader_options(self) -> dict:
        return {"whole_documents": True, "label_codes": True, "next_token_labels": False}

    def train_batch(self, batch: dict) -> dict:
        from train.data.chat import TRAINED

        codes, input_ids = batch["label_codes"], batch["input_ids"]
        following = np.zeros_like(input_ids)
        following[:, :-1] = input_ids[:, 1:]  # a trained token's next is in its conversation,
        trained = (codes >= 0) & (codes & TRAINED > 0)  # so inside the window
        return {**batch, "labels": np.where(trained, following, IGNORE_INDEX)}


# one class per name of train/task_names.py (tests/test_single_sources.py checks both ways)
TASKS = {task.name: task for task in (CausalLM, MaskedLM, TokenClassification, ChatSFT)}


def check_shards_fit(task: str, index: ShardIndex) -> None:
    """The shards were prepared for a task this run can use: labelled sentences for token
    classification; documents otherwise (mlm may read clm shards, whose tokenizer then needs a
    mask token; clm does not read an encoder's [CLS] ... [SEP] documents)."""
    if task == "token-classification" and (index.task != task or not index.label_names):
        raise DataError(f"{index.root} has no label set: prepare it with --task "
                        f"token-classification (it was prepared with --task {index.task})")
    if task == "clm" and index.task == "mlm":
        raise DataError(f"{index.root} was prepared with --task mlm ([CLS] text [SEP] documents "
                        f"for an encoder); task: clm needs shards from --task clm")
    if task != "token-classification" and index.task == "token-classification":
        raise DataError(f"{index.root} was prepared with --task token-classification (labelled "
                        f"sentences); task: {task} needs shards from --task clm or mlm")
    if (task == "sft") != (index.task == "sft"):
        raise DataError(f"{index.root} was prepared with --task {index.task}; task: {task} "
                        f"needs shards from --task {'sft' if task == 'sft' else 'clm'}")


def make_task(cfg, index: ShardIndex) -> Task:
    check_shards_fit(cfg.task, index)
    return TASKS[cfg.task](cfg, index)
