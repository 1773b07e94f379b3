"""Each initialiser's defining property (as in the paper), and the paper's optimizer settings."""
from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor as TransformersAdafactor

from softprompt.models.data import VOCAB_SAMPLE_SIZE, common_token_ids, encode_task
from softprompt.models.tasks import Task, split_three
from softprompt.search.config import search_config
from softprompt.trainables.adafactor import Adafactor
from softprompt.trainables.config import TrainConfig, trial_config
from softprompt.trainables.inits import (
    INITS,
    InitContext,
    class_label,
    random_uniform,
    random_uniform_relative,
    sampled_vocab,
    text,
)
from softprompt.trainables.loop import initial_prompt
from softprompt.trainables.optimizers import (
    DEFAULT_LR,
    OPTIMIZERS,
    adafactor,
    adafactor_hf,
    adamw,
    build_optimizer,
    lr_multiplier,
)

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

VOCAB, WIDTH = 8000, 8
TABLE = torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(0))  # what the model receives per token


def context(**changes) -> InitContext:
    """A random embedding table whose 5,000 'most common' tokens are a shuffled subset of the vocabulary."""
    values = {"embed": lambda ids: TABLE[ids], "width": WIDTH,
              "common_token_ids":
                  torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0)).tolist()[:VOCAB_SAMPLE_SIZE],
              "class_token_ids": [[11, 12, 13], [40], [7, 8]], "text_token_ids": [5, 6, 9],
              "scale": 0.5, "generator": torch.Generator().manual_seed(1)}
    return InitContext(**{**values, **changes})


def row_ids(ctx: InitContext, rows: torch.Tensor) -> list[int]:
    """The vocabulary id of each row, which must be an exact row of the embedding table."""
    ids = []
    for row in rows:
        matches = (TABLE == row).all(-1).nonzero().flatten().tolist()
        assert len(matches) == 1, "not a row of the embedding table"
        ids.append(matches[0])
    return ids


def test_inits_are_registered_by_name():
    assert INITS == {"random_uniform": random_uniform, "random_uniform_relative": random_uniform_relative,
                     "sampled_vocab": sampled_vocab, "class_label": class_label, "text": text}


@pytest.mark.parametrize("scale", [0.5, 0.01])
def test_random_uniform_draws_within_minus_scale_to_scale(scale):
    values = random_uniform(100, context(scale=scale))
    assert values.shape == (100, WIDTH) and values.dtype == torch.float32
    assert values.abs().max() <= scale
    assert values.max() > 0.95 * scale and values.min() < -0.95 * scale  # fills the range
    assert values.std() == pytest.approx(scale / 3 ** 0.5, rel=0.1)  # uniform, not normal
    assert values.unique().numel() == values.numel()


def test_random_uniform_relative_draws_within_scale_times_the_common_tokens_embedding_rms():
    ctx = context(embed=lambda ids: 40.0 * TABLE[ids])  # a model whose token embeddings are far from T5's scale
    rms = (40.0 * TABLE[ctx.common_token_ids]).pow(2).mean().sqrt()
    values = random_uniform_relative(100, ctx)
    assert values.dtype == torch.float32
    assert values.abs().max() <= 0.5 * rms and values.abs().max() > 0.95 * 0.5 * rms
    torch.testing.assert_close(values, random_uniform(100, context()) * rms)  # the same draw, in units of the rms


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
        torch.testing.assert_close(values[i], TABLE[ids].mean(0), atol=1e-6, rtol=0)
    assert set(row_ids(ctx, values[3:])) <= set(ctx.common_token_ids)


def test_class_label_shorter_than_the_class_count_keeps_the_first_classes():
    ctx = context()
    values = class_label(2, ctx)
    torch.testing.assert_close(values, torch.stack([TABLE[[11, 12, 13]].mean(0), TABLE[40]]))


def test_text_init_repeats_the_texts_token_embeddings():
    ctx = context()
    assert torch.equal(text(7, ctx), TABLE[[5, 6, 9, 5, 6, 9, 5]])
    assert torch.equal(text(2, ctx), TABLE[[5, 6]])


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



# ---- a model that scales its embeddings (the Gemma family: by sqrt(width)) ----

@pytest.fixture(scope="module")
def tiny_gemma3(smollm2_tokenizer, tmp_path_factory):
    """A randomly initialised 2-layer Gemma 3 on SmolLM2's vocabulary, saved and loaded through load_backbone."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from softprompt.models.backbone import load_backbone

    tok = smollm2_tokenizer
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    backbone = load_backbone(str(folder), "float32", device=torch.device("cpu"))  # exact comparisons
    assert backbone.model.get_input_embeddings().embed_scale == pytest.approx(32 ** 0.5)
    return backbone


def tiny_task(backbone):
    task = Task("t", ["negative", "positive"],
                split_three([f"text {i}" for i in range(30)], [i % 2 for i in range(30)]))
    return encode_task(task, backbone.tokenizer, False, backbone.vocab_is_frequency_ordered, 32)


def test_class_label_init_copies_what_a_scaling_model_receives_for_the_verbalizer(tiny_gemma3):
    data = tiny_task(tiny_gemma3)
    values = initial_prompt(TrainConfig(prompt_length=4, init="class_label"), tiny_gemma3, data)
    module = tiny_gemma3.model.get_input_embeddings()
    for row, ids in zip(values, data.target_ids):
        received = module(torch.tensor(ids)).mean(0)
        torch.testing.assert_close(row, received.detach())
        torch.testing.assert_close(row, 32 ** 0.5 * module.weight[ids].mean(0))  # sqrt(width) times the table's rows


def test_a_text_init_prompt_acts_on_a_scaling_model_exactly_as_its_tokens_do(tiny_gemma3):
    """The prompt sits beside the module's (scaled) token embeddings and is not scaled again: a prompt
    initialised from some text scores every class as that text written before the input does."""
    from softprompt.models.prompt import PromptedModel, SoftPrompt

    data = tiny_task(tiny_gemma3)
    words = tiny_gemma3.tokenizer("a review of a film:", add_special_tokens=False)["input_ids"]
    cfg = TrainConfig(prompt_length=len(words), init="text", init_text="a review of a film:")
    prompted = PromptedModel(tiny_gemma3, SoftPrompt(initial_prompt(cfg, tiny_gemma3, data)))
    plain = PromptedModel(tiny_gemma3, SoftPrompt(torch.zeros(0, tiny_gemma3.width)))
    inputs = data.splits["test"].input_ids[:3]
    torch.testing.assert_close(prompted.class_scores(data, inputs),
                               plain.class_scores(data, [words + x for x in inputs]))


def reported_lr(backbone, data, **fields) -> float:
    from softprompt.trainables.loop import train

    reports = []
    cfg = TrainConfig(model=backbone.name, batch_size=2, max_steps=1, eval_every=1, max_eval_examples=2, **fields)
    train(cfg, backbone, data, report=lambda metrics, save: reports.append(metrics), score_test=False)
    return reports[0]["lr_absolute"]


def test_an_lr_in_embedding_rms_units_is_the_same_share_of_any_backbone_s_scale(tiny_llama, tiny_gemma3):
    """lr_unit embedding_rms: the optimizer gets lr times the RMS of what the model receives for its common
    tokens, on a model that scales its embeddings (Gemma, by sqrt(width)) as on one that does not."""
    scales = []
    for backbone in (tiny_llama, tiny_gemma3):
        data = tiny_task(backbone)
        received = backbone.model.get_input_embeddings()(torch.tensor(data.common_token_ids[:VOCAB_SAMPLE_SIZE]))
        scales.append(float(received.pow(2).mean().sqrt()))
        assert (reported_lr(backbone, data, optimizer="adamw", lr=0.5, lr_unit="embedding_rms")
                == pytest.approx(0.5 * scales[-1]))
        assert reported_lr(backbone, data, optimizer="adamw", lr=0.5, lr_unit="absolute") == 0.5
        assert reported_lr(backbone, data, optimizer="adafactor") == DEFAULT_LR["adafactor"]  # no lr: the default
    assert max(scales) > 1.5 * min(scales)  # the two scales differ: the test tells the units apart


# ---- optimizers ----

def test_optimizers_are_registered_by_name():
    assert OPTIMIZERS == {"adafactor": adafactor, "adamw": adamw, "adafactor_hf": adafactor_hf}


def test_adafactor_is_t5xs_with_the_papers_settings():
    prompt = torch.nn.Parameter(torch.zeros(4, WIDTH))
    optimizer, _ = build_optimizer("adafactor", prompt, lr=0.3, weight_decay=1e-5, warmup_steps=0,
                                   decay_factor=None, max_steps=100)
    assert isinstance(optimizer, Adafactor)
    (group,) = optimizer.param_groups
    assert group.pop("params") == [prompt]
    assert group == {"lr": 0.3, "initial_lr": 0.3, "weight_decay": 1e-5, "decay_rate": 0.8,  # beta2_t = 1 - t^-0.8
                     "clipping_threshold": 1.0, "min_dim_size_to_factor": 128, "epsilon1": 1e-30, "epsilon2": 1e-3,
                     "multiply_by_parameter_scale": False}


def test_adafactor_hf_is_transformers_adafactor_at_the_papers_settings():
    prompt = torch.nn.Parameter(torch.zeros(4, WIDTH))
    optimizer, _ = build_optimizer("adafactor_hf", prompt, lr=0.3, weight_decay=1e-5, warmup_steps=0,
                                   decay_factor=None, max_steps=100)
    assert isinstance(optimizer, TransformersAdafactor)
    (group,) = optimizer.param_groups
    assert group["params"] == [prompt]
    assert group["lr"] == 0.3
    assert group["scale_parameter"] is False
    assert group["relative_step"] is False
    assert group["warmup_init"] is False
    assert group["decay_rate"] == -0.8  # HF: beta2_t = 1 - t^decay_rate, i.e. the paper's 0.8 decay
    assert group["weight_decay"] == 1e-5
    assert group["beta1"] is None


@pytest.mark.parametrize("name, option", [("adafactor", "multiply_by_parameter_scale"),
                                          ("adafactor_hf", "scale_parameter")])
def test_parameter_scaling_turns_on_each_adafactors_own_option(name, option):
    prompt = torch.nn.Parameter(torch.zeros(4, WIDTH))
    optimizer, _ = build_optimizer(name, prompt, lr=0.3, weight_decay=1e-5, warmup_steps=0,
                                   decay_factor=None, max_steps=100, parameter_scaling=True)
    assert optimizer.param_groups[0][option] is True


def optimizer_lr(cfg: TrainConfig) -> float:
    """The lr that reaches the optimizer of a run with this config."""
    optimizer, _ = build_optimizer(cfg.optimizer, torch.nn.Parameter(torch.zeros(4, WIDTH)), cfg.lr, cfg.weight_decay,
                                   cfg.warmup_steps, cfg.decay_factor, cfg.max_steps, cfg.decay_steps,
                                   cfg.parameter_scaling)
    return optimizer.param_groups[0]["lr"]


def test_the_default_run_is_the_papers_optimizer_setting():
    cfg = TrainConfig()
    assert (cfg.optimizer, optimizer_lr(cfg), cfg.weight_decay) == ("adafactor", 0.3, 1e-5)
    assert DEFAULT_LR == {"adafactor": 0.3, "adamw": 0.03, "adafactor_hf": 0.3}


def test_naming_only_the_optimizer_runs_it_at_its_own_default_lr():
    assert optimizer_lr(TrainConfig(optimizer="adamw")) == 0.03
    assert optimizer_lr(TrainConfig(optimizer="adamw", lr=0.1)) == 0.1


def search_train_fields(model_dir, train: dict, space: dict) -> dict:
    """The fixed TrainConfig fields a search hands every trial."""
    return search_config({"space": space, "train": {"model": str(model_dir), **train}}).train.to_dict()


def test_a_trial_whose_space_picks_the_optimizer_but_not_the_lr_runs_at_that_optimizers_default(tiny_llama_dir):
    base = search_train_fields(tiny_llama_dir, {}, {"optimizer": {"choices": ["adamw"]}})
    assert optimizer_lr(trial_config({"optimizer": "adamw"}, base)) == 0.03  # not Adafactor's 0.3
    assert optimizer_lr(trial_config({"optimizer": "adafactor"}, base)) == 0.3
    assert optimizer_lr(trial_config({"optimizer": "adamw", "lr@adamw": 0.01}, base)) == 0.01  # the space's lr wins


def test_a_search_that_sets_train_lr_runs_every_trial_at_it_unless_the_space_sets_lr(tiny_llama_dir):
    base = search_train_fields(tiny_llama_dir, {"lr": 0.1}, {"optimizer": {"choices": ["adamw", "adafactor"]}})
    assert optimizer_lr(trial_config({"optimizer": "adamw"}, base)) == 0.1
    assert optimizer_lr(trial_config({"optimizer": "adafactor"}, base)) == 0.1
    assert optimizer_lr(trial_config({"optimizer": "adamw", "lr": 0.02}, base)) == 0.02


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


def test_lr_multiplier_with_decay_steps_multiplies_by_the_factor_every_decay_steps():
    assert [lr_multiplier(s, 0, 0.5, 100, decay_steps=3) for s in range(8)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    # warmup multiplies, and the steps count from 0, not from the end of warmup (T5X's decay_every)
    assert ([lr_multiplier(s, 4, 0.1, 100, decay_steps=2) for s in range(5)]
            == pytest.approx([0.25, 0.5, 0.075, 0.1, 0.01]))


def test_decay_steps_without_a_decay_factor_keeps_the_lr():
    assert [lr_multiplier(s, 0, None, 100, decay_steps=2) for s in range(5)] == [1.0] * 5


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
