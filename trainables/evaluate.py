"""Held-out evaluation: rank classification or exact-match generation; accuracy and F1."""
from __future__ import annotations

import numpy as np

from trainables.data import EncodedSplit, EncodedTask, eval_chunks
from trainables.prompt import PromptedModel

ILLEGAL = -1  # a generation that matches no verbalizer


def rank_classify(pm: PromptedModel, data: EncodedTask, split: EncodedSplit, batch_size: int) -> np.ndarray:
    """The class whose verbalizer is most likely under the prompted model."""
    predictions = np.empty(len(split), dtype=np.int64)
    for idx in eval_chunks(split, batch_size):
        scores = pm.class_scores(data, [split.input_ids[i] for i in idx])
        predictions[idx] = scores.argmax(-1).cpu().numpy()
    return predictions


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
    """F1 of the positive class (label 1) for binary tasks, macro F1 for multi-class ones."""
    def f1(c: int) -> float:
        tp = np.sum((predictions == c) & (labels == c))
        denominator = np.sum(predictions == c) + np.sum(labels == c)
        return 2 * tp / denominator if denominator else 0.0
    classes = [1] if n_classes == 2 else range(n_classes)
    return float(np.mean([f1(c) for c in classes]))


def evaluate(pm: PromptedModel, data: EncodedTask, split: str = "dev", mode: str = "rank",
             batch_size: int = 32) -> dict:
    """accuracy, f1 and (for exact match) the fraction of outputs that are a legal label."""
    rows = data.splits[split]
    labels = np.asarray(rows.labels)
    predictions = EVAL_MODES[mode](pm, data, rows, batch_size)
    metrics = {"accuracy": float(np.mean(predictions == labels)),
               "f1": f1_score(predictions, labels, len(data.verbalizers))}
    if mode == "exact_match":
        metrics["legal_rate"] = float(np.mean(predictions != ILLEGAL))
    return metrics
