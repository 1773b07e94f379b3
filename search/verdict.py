"""A finished search's verdict: its winner's held-out test accuracy against the same model without a
prompt (zero-shot), saved as the search's summary and logged on its parent run if it is tracked."""
from __future__ import annotations

from softprompt.models.backbone import load_backbone
from softprompt.models.checkpoint import load_checkpoint
from softprompt.models.data import EncodedTask
from softprompt.models.evaluate import evaluate
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.search.record import SearchRecord
from softprompt.search.tracking import log_verdict
from softprompt.trainables.config import trial_config
from softprompt.trainables.loop import prepare_data, zero_shot


def judge_winner(record: SearchRecord) -> tuple[dict, EncodedTask]:
    """Score the winner on test beside zero-shot (this loads its backbone), then save and log the summary.
    Returns the summary and the task's data, whose splits the report cites."""
    cfg, best = record.config, record.best()
    train_cfg = trial_config(best["params"], cfg.train.to_dict())
    backbone = load_backbone(train_cfg.model, train_cfg.dtype)
    data = prepare_data(train_cfg, backbone)
    baseline = zero_shot(train_cfg, backbone, data)
    test_accuracy = best["test_accuracy"]
    if test_accuracy is None:  # the winner was stopped before its own test evaluation
        prompt = load_checkpoint(best["prompt"], backbone.fingerprint, backbone.width).prompt
        test_accuracy = evaluate(PromptedModel(backbone, SoftPrompt(prompt)), data, "test", train_cfg.eval_mode,
                                 train_cfg.eval_batch_size)["accuracy"]
    summary = {"search": record.storage.name, "best_trial": best["trial_id"], "params": best["params"],
               cfg.metric: best["metric"], "confirmed": best["confirmed"], "test_accuracy": test_accuracy,
               "test_examples": len(data.splits["test"]), "zero_shot_test_accuracy": baseline["accuracy"],
               "beats_zero_shot": test_accuracy > baseline["accuracy"], "prompt": best["prompt"],
               "trials": len(record.trials), "statuses": record.statuses()}
    record.save_summary(summary)
    log_verdict(record.storage, summary)
    return summary, data
