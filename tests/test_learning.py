"""Prompt tuning learns: a short run with the real SmolLM2-135M on Rotten Tomatoes (1.5-2 minutes
on 2 CPU cores)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from softprompt.models.data import EncodedSplit, make_batch
from softprompt.models.evaluate import evaluate
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import initial_prompt, prepare_data, train

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def training_loss(backbone, data, values: torch.Tensor, n: int = 32) -> float:
    """Mean loss of `values` as the prompt on the first n training examples."""
    pm, split = PromptedModel(backbone, SoftPrompt(values)), data.splits["train"]
    with torch.no_grad():
        return sum(pm.loss(make_batch(data, split.input_ids[i:i + 16], split.labels[i:i + 16])).item()
                   for i in range(0, n, 16)) / (n // 16)


def test_a_short_run_lowers_the_training_loss_and_beats_the_untrained_prompt_on_dev(smollm2, two_threads):
    cfg = TrainConfig(model="smollm2-135m", task="rotten_tomatoes", prompt_length=20, init="class_label",
                      optimizer="adamw", lr=0.03, batch_size=8, max_steps=30, eval_every=30,
                      max_train_examples=None, max_eval_examples=100, seed=0)
    data = prepare_data(cfg, smollm2)
    test = data.splits["test"]  # not what this test is about: keep train()'s final test evaluation short
    data = dataclasses.replace(data, splits={**data.splits, "test": EncodedSplit(test.input_ids[:8], test.labels[:8])})
    start = initial_prompt(cfg, smollm2, data)
    untrained = evaluate(PromptedModel(smollm2, SoftPrompt(start)), data, "dev")["accuracy"]

    result = train(cfg, smollm2, data)

    # Seen on CPU, seed 0 at 30 steps: dev accuracy 0.66 -> 0.83 on these 100 dev examples (0.63 -> 0.805 on
    # 200), training loss 4.6 -> 0.50. Seeds 1 and 2 at 40 steps, 200 dev examples: 0.745 -> 0.80 and
    # 0.745 -> 0.795, loss 3.3 -> 0.50 and 3.9 -> 0.55; both clear these bounds too.
    assert result["best_step"] == cfg.max_steps  # one evaluation, so the best prompt is the final one
    assert result["best_dev_accuracy"] >= untrained + 0.04
    assert result["best_dev_accuracy"] >= 0.75
    assert training_loss(smollm2, data, result["prompt"]) < 0.5 * training_loss(smollm2, data, start)
