"""Each initialiser's defining property (as in the paper), and the paper's optimizer settings."""
from __future__ import annotations

import pytest
import torch

from trainables.config import TrainConfig
from trainables.data import encode_task
from trainables.inits import (INITS, VOCAB_SAMPLE_SIZE, InitContext, class_label, common_token_ids, random_uniform,
                              sampled_vocab, text)
from trainables.loop import initial_prompt
from trainables.optimizers import DEFAULT_LR, build_optimizer, lr_multiplier
from trainables.tasks import Task, split_three

VOCAB, WIDTH = 8000, 8


def context(**changes) -> InitContext:
    """A random embedding table whose 5,000 'most common' tokens are a shuffled subset of the vocabulary."""
    generator = torch.Generator().manual_seed(0)
    values = {"embeddings": torch.randn(VOCAB, WIDTH, generator=generator),
              "common_token_ids": torch.randperm(VOCAB, generator=generator).tolist()[:VOCAB_SAMPLE_SIZE],
              "class_token_ids": [[11, 12, 13], [40], [7, 8]], "text_token_ids": [5, 6, 9],
              "scale": 0.5, "generator": torch.Generator().manual_seed(1)}
    return InitContext(**{**values, **changes})


def row_ids(ctx: InitContext, rows: torch.Tensor) -> list[int]:
    """The vocabulary id of each row, which must be an exact row of the embedding table."""
    ids = []
    for row in rows:
        matches = (ctx.embeddings == row).all(-1).nonzero().flatten().tolist()
        assert len(matches) == 1, "not a row of the embedding table"
        ids.append(matches[0])
    return ids


def test_inits_are_registered_by_name():
    assert INITS == {"random_uniform": random_uniform, "sampled_vocab": sampled_vocab,
                     "class_label": class_label, "text": text}


@pytest.mark.parametrize("scale", [0.5, 0.01])
def test_random_uniform_draws_within_minus_scale_to_scale(scale):
    values = random_uniform(100, context(scale=scale))
    assert values.shape == (100, WIDTH) and values.dtype == torch.float32
    assert values.abs().max() <= scale
    assert values.max() > 0.95 * scale and values.min() < -0.95 * scale  # fills the range
    assert values.std() == pytest.approx(scale / 3 ** 0.5, rel=0.1)  # uniform, not normal
    assert values.unique().numel() == values.numel()


def test_inits_are_reproducible_from_the_generator_seed():
    for init in INITS.values():
        assert torch.equal(init(30, context()), init(30, context()))
    assert not torch.equal(random_uniform(30, context()),
                           random_uniform(30, context(generator=torch.Generator().manual_seed(2))))


def test_sampled_vocab_rows_are_distinct_embeddings_of_the_most_common_tokens():
    ctx = context()
    ids = row_ids(ctx, sampled_vocab(100, ctx))
    assert set(ids) <= set(ctx.common_token_ids[:VOCAB_SAMPLE_SIZE])
    assert len(set(ids)) == 100


def test_sampled_vocab_never_draws_beyond_the_5000_most_common_tokens():
    ctx = context(common_token_ids=list(range(VOCAB)))  # longer than the paper's pool
    ids = row_ids(ctx, sampled_vocab(200, ctx))
    assert max(ids) < VOCAB_SAMPLE_SIZE
    assert max(ids) > VOCAB_SAMPLE_SIZE // 2  # drawn across the pool, not just its head


def test_class_label_rows_are_verbalizer_means_then_common_tokens():
    ctx = context()
    values = class_label(10, ctx)
    assert values.shape == (10, WIDTH)
    for i, ids in enumerate(ctx.class_token_ids):
        torch.testing.assert_close(values[i], ctx.embeddings[ids].mean(0), atol=1e-6, rtol=0)
    assert set(row_ids(ctx, values[3:])) <= set(ctx.common_token_ids)


def test_class_label_shorter_than_the_class_count_keeps_the_first_classes():
    ctx = context()
    values = class_label(2, ctx)
    torch.testing.assert_close(values, torch.stack([ctx.embeddings[[11, 12, 13]].mean(0), ctx.embeddings[40]]))


def test_text_init_repeats_the_texts_token_embeddings():
    ctx = context()
    assert torch.equal(text(7, ctx), ctx.embeddings[[5, 6, 9, 5, 6, 9, 5]])
    assert torch.equal(text(2, ctx), ctx.embeddings[[5, 6]])


def test_common_token_ids_for_bpe_counts_frequencies_most_frequent_first():
    texts = [[5, 5, 5, 7, 7, 9, 1], [7, 5, 1, 1, 1, 1]]
    ids = common_token_ids(texts, vocab_size=VOCAB, special_ids={0, 1, 2}, frequency_ordered=False)
    assert ids[:3] == [5, 7, 9]               # 4x, 3x, 1x; the special id 1 (5x) is left out
    assert ids[3:8] == [3, 4, 6, 8, 10]       # topped up with the lowest unseen, non-special ids
    assert len(ids) == VOCAB_SAMPLE_SIZE and len(set(ids)) == VOCAB_SAMPLE_SIZE
    assert not {0, 1, 2} & set(ids)


def test_common_token_ids_for_frequency_ordered_vocabularies_are_the_low_ids_in_order():
    ids = common_token_ids([[900, 900, 900]], vocab_size=VOCAB, special_ids={0, 1, 2}, frequency_ordered=True)
    assert ids == list(range(3, VOCAB_SAMPLE_SIZE + 3))


def test_common_token_ids_of_a_small_vocabulary_stop_at_its_size():
    assert common_token_ids([[4, 4]], vocab_size=6, special_ids={0}, frequency_ordered=False) == [4, 1, 2, 3, 5]


def test_class_label_init_on_t5_averages_the_verbalizer_without_its_eos(tiny_t5):
    task = Task("t", ["very negative", "positive"],
                split_three([f"text {i}" for i in range(30)], [i % 2 for i in range(30)]))
    data = encode_task(task, tiny_t5.tokenizer, True, tiny_t5.vocab_is_frequency_ordered, 32)
    assert data.target_ids[0][-1] == tiny_t5.tokenizer.eos_token_id
    values = initial_prompt(TrainConfig(prompt_length=4, init="class_label"), tiny_t5, data)
    embeddings = tiny_t5.model.get_input_embeddings().weight.detach()
    words = tiny_t5.tokenizer("very negative", add_special_tokens=False)["input_ids"]
    assert len(words) == 2
    torch.testing.assert_close(values[0], embeddings[words].mean(0), atol=1e-6, rtol=0)


# ---- optimizers ----

def test_adafactor_uses_the_papers_settings():
    prompt = torch.nn.Parameter(torch.zeros(4, WIDTH))
    optimizer, _ = build_optimizer("adafactor", prompt, lr=0.3, weight_decay=1e-5, warmup_steps=0,
                                   decay_factor=None, max_steps=100)
    assert type(optimizer).__name__ == "Adafactor"
    (group,) = optimizer.param_groups
    assert group["params"] == [prompt]
    assert group["lr"] == 0.3
    assert group["scale_parameter"] is False
    assert group["relative_step"] is False
    assert group["warmup_init"] is False
    assert group["decay_rate"] == -0.8  # HF: beta2_t = 1 - t^decay_rate, i.e. the paper's 0.8 decay
    assert group["weight_decay"] == 1e-5
    assert group["beta1"] is None


def test_the_default_run_is_the_papers_optimizer_setting():
    cfg = TrainConfig()
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("adafactor", 0.3, 1e-5)
    assert DEFAULT_LR == {"adafactor": 0.3, "adamw": 0.03}


def test_adamw_gets_the_given_lr_and_weight_decay():
    prompt = torch.nn.Parameter(torch.zeros(4, WIDTH))
    optimizer, _ = build_optimizer("adamw", prompt, lr=0.03, weight_decay=0.01, warmup_steps=0,
                                   decay_factor=None, max_steps=100)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]) == (0.03, 0.01)


def test_lr_multiplier_warms_up_linearly_then_holds():
    assert [lr_multiplier(s, 4, None, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_multiplier(s, 0, None, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]  # constant, as in the paper


def test_lr_multiplier_decays_exponentially_to_the_factor_at_max_steps():
    assert lr_multiplier(0, 0, 0.1, 100) == 1.0
    assert lr_multiplier(50, 0, 0.1, 100) == pytest.approx(0.1 ** 0.5)
    assert lr_multiplier(100, 0, 0.1, 100) == pytest.approx(0.1)
    assert lr_multiplier(1, 4, 0.1, 100) == pytest.approx(0.5 * 0.1 ** 0.01)  # warmup and decay multiply


def test_the_schedule_sets_the_optimizers_lr_every_step():
    prompt = torch.nn.Parameter(torch.zeros(4, WIDTH))
    optimizer, schedule = build_optimizer("adafactor", prompt, lr=0.3, weight_decay=1e-5, warmup_steps=3,
                                          decay_factor=0.5, max_steps=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        prompt.grad = torch.ones_like(prompt)
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.3 * lr_multiplier(s, 3, 0.5, 10) for s in range(10)])
