"""Held-out evaluation: rank classification or exact-match generation; accuracy and F1, and for
rank classification the log-loss and AUC of the class scores."""
from __future__ import annotations

import numpy as np

from softprompt.models.data import EncodedSplit, EncodedTask, eval_chunks
from softprompt.models.prompt import PromptedModel

ILLEGAL = -1  # a generation that matches no verbalizer


def split_class_scores(pm: PromptedModel, data: EncodedTask, split: EncodedSplit, batch_size: int) -> np.ndarray:
    """[N, C] log-likelihood of every class's verbalizer under the prompted model."""
    scores = np.empty((len(split), len(data.target_ids)), dtype=np.float64)
    chunks = eval_chunks(split, batch_size)
    for idx, chunk in zip(chunks, pm.class_scores_batches(data, [[split.input_ids[i] for i in idx] for idx in chunks])):
        scores[idx] = chunk.float().cpu().numpy()
    return scores


def rank_classify(pm: PromptedModel, data: EncodedTask, split: EncodedSplit, batch_size: int) -> np.ndarray:
    """The class whose verbalizer is most likely under the prompted model."""
    return split_class_scores(pm, data, split, batch_size).argmax(-1)


def exact_match(pm: PromptedModel, data: EncodedTask, split: EncodedSplit, batch_size: int) -> np.ndarray:
    """The class whose verbalizer the greedy continuation spells exactly, else ILLEGAL."""
    tokenizer = pm.backbone.tokenizer
    by_text = {v.strip(): c for c, v in enumerate(data.verbalizers)}
    longest = max(len(ids) for ids in data.target_ids)
    predictions = np.empty(len(split), dtype=np.int64)
    for idx in eval_chunks(split, batch_size):
        outputs = pm.generate(data, [split.input_ids[i] for i in idx], longest)
        texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
        predictions[idx] = [by_text.get(_first_line(t), ILLEGAL) for t in texts]
    return predictions


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


EVAL_MODES = {"rank": rank_classify, "exact_match": exact_match}


def f1_score(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """F1 of the positive class (label 1) for binary tasks, macro F1 for multi-class ones; a class
    never predicted nor present scores 0 (sklearn's zero_division=0, whose import costs a trial ~0.8 s)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    values = []
    for c in ([1] if n_classes == 2 else range(n_classes)):
        true_pos = np.sum((predictions == c) & (labels == c))
        denominator = np.sum(predictions == c) + np.sum(labels == c)
        values.append(2.0 * true_pos / denominator if denominator else 0.0)
    return float(np.mean(values))


def log_loss(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class, the class scores renormalised over the classes."""
    # In log space, not sklearn's log_loss: it clips probabilities at float eps, capping an example at
    # 36 nats, which moved the mean by up to 12% where margins reach ~30 (measured on random scores).
    logp = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of each class's log-odds against the other classes, averaged over the classes that
    occur (for two classes both give the AUC of the margin between the two scores). Unlike accuracy
    it does not move when every score shifts one way, so it is not fooled by a prompt's calibration."""

    def log_odds(c):
        return scores[:, c] - np.logaddexp.reduce(np.delete(scores, c, axis=1), axis=1)

    values = [roc_auc(labels == c, log_odds(c)) for c in range(scores.shape[1])
              if 0 < np.sum(labels == c) < len(labels)]
    return float(np.mean(values)) if values else float("nan")


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """The chance that a positive example scores above a negative one, ties counting half (the
    Mann-Whitney U statistic, which is the area under the ROC curve)."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]  # tied scores share their mean rank
    ends = np.r_[starts[1:], len(score)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    n_pos = int(np.sum(positive))
    n_neg = len(score) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def evaluate(pm: PromptedModel, data: EncodedTask, split: str = "dev", mode: str = "rank",
             batch_size: int = 32) -> dict:
    """accuracy and f1; for rank classification also log_loss and auc (from the class scores), for
    exact match the fraction of outputs that are a legal label."""
    rows = data.splits[split]
    labels = np.asarray(rows.labels)
    if mode == "rank":
        scores = split_class_scores(pm, data, rows, batch_size)
        predictions = scores.argmax(-1)
        extra = {"log_loss": log_loss(scores, labels), "auc": auc(scores, labels)}
    else:
        predictions = EVAL_MODES[mode](pm, data, rows, batch_size)
        extra = {"legal_rate": float(np.mean(predictions != ILLEGAL))}
    return {"accuracy": float(np.mean(predictions == labels)),
            "f1": f1_score(predictions, labels, len(data.verbalizers)), **extra}
