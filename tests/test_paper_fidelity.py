"""What the paper's code did, done here: T5X's Adafactor, Table 6's search space and schedule, and
dropout on the embedded input while training."""
from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch

from softprompt.models.data import SENTINEL, encode_task, make_batch
from softprompt.models.evaluate import evaluate
from softprompt.models.prompt import InputDropout, PromptedModel, SoftPrompt
from softprompt.models.tasks import Task, split_three
from softprompt.search.config import TRAIN_RULES, ConfigError, check_fields, search_config, train_config
from softprompt.spaces import DEFAULT_POINTS, paper
from softprompt.trainables.adafactor import Adafactor
from softprompt.trainables.config import TrainConfig, fields_from_params
from softprompt.trainables.loop import train
from softprompt.trainables.optimizers import OPTIMIZERS, build_optimizer

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- Adafactor as T5X runs it ----

def t5x_adafactor_reference(p0: np.ndarray, grads: list[np.ndarray], lr: float, weight_decay: float,
                            parameter_scaling: bool = False) -> tuple[np.ndarray, int]:
    """T5X's Adafactor in float64 numpy, written from the Adafactor paper (Shazeer & Stern 2018,
    Algorithms 4-5: row and column SUMS R and C, V = R C / sum(R)) with T5X's details: beta2_t =
    1 - t^-0.8, 1e-30 added to g^2, factored only if both dimensions are >= 128, the update divided
    by max(1, RMS(u)), p <- (1 - weight_decay) p - step * u. Returns the parameter and how many
    steps the clip shrank."""
    p = p0.astype(np.float64)
    n, m = p.shape
    factored = min(n, m) >= 128
    row_sums, col_sums, second_moment = np.zeros(n), np.zeros(m), np.zeros((n, m))
    clipped = 0
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        beta2 = 1.0 - t ** -0.8
        g2 = g ** 2 + 1e-30
        if factored:
            row_sums = beta2 * row_sums + (1 - beta2) * g2.sum(axis=1)
            col_sums = beta2 * col_sums + (1 - beta2) * g2.sum(axis=0)
            v = np.outer(row_sums, col_sums) / row_sums.sum()
        else:
            second_moment = beta2 * second_moment + (1 - beta2) * g2
            v = second_moment
        u = g / np.sqrt(v)
        rms = np.sqrt(np.mean(u ** 2))
        clipped += rms > 1.0
        u = u / max(1.0, rms)
        step = lr * max(1e-3, np.sqrt(np.mean(p ** 2))) if parameter_scaling else lr
        p = (1.0 - weight_decay) * p - step * u
    return p, clipped


def gradients(shape, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Gradients whose rows differ in scale (so a factored estimate is not exact) and that grow
    fourfold per step (so the update clip acts after the first step)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.exp(torch.randn(shape[0], 1, generator=gen))
    return [torch.randn(shape, generator=gen) * rows * 4.0 ** t for t in range(steps)]


def adafactor_steps(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, weight_decay: float,
                    parameter_scaling: bool = False) -> tuple[torch.Tensor, Adafactor]:
    prompt = torch.nn.Parameter(p0.clone())
    optimizer, _ = build_optimizer("adafactor", prompt, lr, weight_decay, warmup_steps=0, decay_factor=None,
                                   max_steps=100, parameter_scaling=parameter_scaling)
    for g in grads:
        prompt.grad = g.clone()
        optimizer.step()
    return prompt.detach(), optimizer


def test_one_fresh_adafactor_step_moves_every_element_of_a_20_by_576_prompt_by_lr_times_the_gradient_sign():
    p0 = torch.empty(20, 576).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
    (grad,) = gradients(p0.shape, 1)
    p1, _ = adafactor_steps(p0, [grad], lr=0.3, weight_decay=1e-5)
    torch.testing.assert_close(p1, (1 - 1e-5) * p0 - 0.3 * grad.sign(), rtol=0, atol=1e-6)
    assert ((p1 - p0).abs() - 0.3).abs().max() < 1e-5  # up to the weight decay, 1e-5 of at most 0.5


def test_adafactor_removes_weight_decay_of_the_weight_per_step_not_lr_times_it():
    p0 = torch.empty(20, 576).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
    (grad,) = gradients(p0.shape, 1)
    p1, _ = adafactor_steps(p0, [grad], lr=0.3, weight_decay=0.1)
    torch.testing.assert_close(p1, 0.9 * p0 - 0.3 * grad.sign())  # T5X: (1 - rate) p; transformers: (1 - lr * rate) p


@pytest.mark.parametrize("shape, factored", [((20, 576), False), ((100, 4096), False), ((127, 4096), False),
                                             ((4096, 100), False), ((128, 128), True), ((150, 4096), True)])
def test_adafactor_factors_the_second_moment_only_when_both_dimensions_are_at_least_128(shape, factored):
    _, optimizer = adafactor_steps(torch.zeros(shape), gradients(shape, 1), lr=0.3, weight_decay=1e-5)
    (state,) = optimizer.state.values()
    if factored:
        assert "v" not in state
        assert state["v_row"].shape == (min(shape),) and state["v_col"].shape == (max(shape),)
    else:
        assert "v_row" not in state and "v_col" not in state
        assert state["v"].shape == shape


def test_a_factored_150_by_4096_prompt_does_not_step_by_the_gradient_sign():
    p0 = torch.zeros(150, 4096)
    (grad,) = gradients(p0.shape, 1)
    p1, _ = adafactor_steps(p0, [grad], lr=0.3, weight_decay=1e-5)
    assert not torch.allclose(p1.abs(), torch.full_like(p1, 0.3), atol=1e-3)  # rows of unequal scale


@pytest.mark.parametrize("shape", [(20, 576), (150, 4096)])
@pytest.mark.parametrize("parameter_scaling", [False, True])
def test_five_adafactor_steps_match_an_independent_reference(shape, parameter_scaling):
    p0 = torch.empty(shape).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    grads = gradients(shape, 5, seed=3)
    expected, clipped = t5x_adafactor_reference(p0.numpy(), [g.numpy() for g in grads], 0.3, 1e-5, parameter_scaling)
    assert clipped >= 3  # the clip is exercised, not only the first step
    got, _ = adafactor_steps(p0, grads, lr=0.3, weight_decay=1e-5, parameter_scaling=parameter_scaling)
    torch.testing.assert_close(got, torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-6)


def test_transformers_adafactor_is_kept_under_its_own_name_and_differs_from_the_papers():
    assert OPTIMIZERS["adafactor_hf"].__name__ == "adafactor_hf"
    p0 = torch.zeros(20, 576)
    (grad,) = gradients(p0.shape, 1)
    prompt = torch.nn.Parameter(p0.clone())
    optimizer, _ = build_optimizer("adafactor_hf", prompt, 0.3, 1e-5, warmup_steps=0, decay_factor=None, max_steps=100)
    prompt.grad = grad
    optimizer.step()
    assert not torch.allclose(prompt.detach().abs(), torch.full_like(p0, 0.3), atol=1e-3)  # it factors [20, 576]


def test_transformers_adafactor_state_is_refused_with_the_name_that_resumes_it():
    prompt = torch.nn.Parameter(torch.zeros(20, 576))
    old, _ = build_optimizer("adafactor_hf", prompt, 0.3, 1e-5, warmup_steps=0, decay_factor=None, max_steps=100)
    prompt.grad = torch.ones_like(prompt)
    old.step()
    new, _ = build_optimizer("adafactor", prompt, 0.3, 1e-5, warmup_steps=0, decay_factor=None, max_steps=100)
    with pytest.raises(ValueError, match="is not T5X Adafactor's .* resumes with adafactor_hf"):
        new.load_state_dict(old.state_dict())


# ---- Table 6 ----

def test_the_paper_space_draws_table_6s_values_scaled_to_the_budget():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {"warmup_fraction": set(), "decay_factor": set(), "decay_fraction": set(), "parameter_scaling": set()}
    for _ in range(200):
        trial = study.ask()
        paper(trial, ["smollm2-135m"])
        params = trial.params
        assert ("parameter_scaling" in params) == (params["optimizer"] == "adafactor")
        assert ("decay_fraction" in params) == (params["decay_factor"] is not None)  # no decay: no steps per decay
        for key in seen:
            if key in params:
                seen[key].add(params[key])
        check_fields(fields_from_params(params, 30_000), TRAIN_RULES, None)  # every draw is a legal config
        study.tell(trial, 0.5)
    assert seen == {"warmup_fraction": {0.0, 2 / 30, 3 / 30}, "decay_factor": {None, 0.1, 0.5},
                    "decay_fraction": {4 / 30, 6 / 30, 8 / 30}, "parameter_scaling": {False, True}}


def test_table_6_step_counts_become_steps_of_the_budget():
    fields = fields_from_params({"warmup_fraction": 2 / 30, "decay_factor": 0.5, "decay_fraction": 4 / 30}, 30_000)
    assert (fields["warmup_steps"], fields["decay_steps"]) == (2000, 4000)
    assert fields_from_params({"decay_fraction": 4 / 30}, 3)["decay_steps"] == 1  # never 0 on a tiny budget


def test_the_paper_default_point_is_a_point_of_the_paper_space():
    study = optuna.create_study()
    study.enqueue_trial(DEFAULT_POINTS["paper"])
    trial = study.ask()
    paper(trial, ["smollm2-135m"])
    assert trial.params == DEFAULT_POINTS["paper"]


def test_a_decay_every_decay_steps_reaches_the_optimizer_as_a_staircase():
    cfg = TrainConfig(lr=0.3, decay_factor=0.5, decay_steps=4, max_steps=12)
    prompt = torch.nn.Parameter(torch.zeros(4, 8))
    optimizer, schedule = build_optimizer(cfg.optimizer, prompt, cfg.lr, cfg.weight_decay, cfg.warmup_steps,
                                          cfg.decay_factor, cfg.max_steps, cfg.decay_steps)
    seen = []
    for _ in range(cfg.max_steps):
        seen.append(optimizer.param_groups[0]["lr"])
        prompt.grad = torch.ones_like(prompt)
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.3] * 4 + [0.15] * 4 + [0.075] * 4)


# ---- dropout on the embedded input ----

BACKBONES = ["tiny_llama", "tiny_t5"]


def reviews_data(backbone):
    inputs = [f"review: a film that was {'good ' * (i % 5)}and long #{i}\nsentiment:" for i in range(40)]
    task = Task("reviews", ["negative", "positive"], split_three(inputs, [i % 2 for i in range(40)]))
    return encode_task(task, backbone.tokenizer, backbone.is_encoder_decoder, backbone.vocab_is_frequency_ordered, 64)


def prompted(backbone) -> PromptedModel:
    return PromptedModel(backbone,
                         SoftPrompt(torch.randn(5, backbone.width, generator=torch.Generator().manual_seed(0))))


def embeds_received(pm: PromptedModel, batch, dropout) -> torch.Tensor:
    """The inputs_embeds the model receives in the training loss."""
    seen = []
    hook = pm.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]),
                                              with_kwargs=True)
    try:
        pm.loss(batch, dropout)
    finally:
        hook.remove()
    return seen[0].detach()


@pytest.mark.parametrize("name", BACKBONES)
def test_dropout_0_is_no_dropout(name, request):
    backbone = request.getfixturevalue(name)
    data, pm = reviews_data(backbone), prompted(backbone)
    batch = make_batch(data, data.splits["train"].input_ids[:4], data.splits["train"].labels[:4])
    assert InputDropout.for_step(0.0, seed=0, step=3) is None
    assert torch.equal(pm.loss(batch, InputDropout.for_step(0.0, 0, 3)), pm.loss(batch))


@pytest.mark.parametrize("name", BACKBONES)
def test_dropout_zeroes_features_of_prompt_and_input_alike_and_scales_the_rest(name, request):
    backbone = request.getfixturevalue(name)
    data, pm = reviews_data(backbone), prompted(backbone)
    batch = make_batch(data, data.splits["train"].input_ids[:4], data.splits["train"].labels[:4])
    plain = embeds_received(pm, batch, None)
    dropped = embeds_received(pm, batch, InputDropout.for_step(0.3, 0, 3))
    kept = dropped != 0
    present = plain != 0  # a padding token's embedding row may be zeros
    for part in (slice(0, 5), slice(5, None)):  # the prompt's 5 positions, then the embedded text
        assert 0.25 < 1 - kept[:, part][present[:, part]].float().mean() < 0.35
    torch.testing.assert_close(dropped[kept], plain[kept] / 0.7)


@pytest.mark.parametrize("name", BACKBONES)
def test_dropout_masks_are_fixed_by_seed_and_step_and_scoring_never_drops(name, request):
    backbone = request.getfixturevalue(name)
    data, pm = reviews_data(backbone), prompted(backbone)
    batch = make_batch(data, data.splits["train"].input_ids[:4], data.splits["train"].labels[:4])
    losses = [pm.loss(batch, InputDropout.for_step(0.3, seed, step))
              for seed, step in ((0, 3), (0, 3), (0, 4), (1, 3))]
    assert torch.equal(losses[0], losses[1])
    assert len({loss.item() for loss in losses[1:]} | {pm.loss(batch).item()}) == 4
    inputs = data.splits["dev"].input_ids[:6]
    assert torch.equal(pm.class_scores(data, inputs), pm.class_scores(data, inputs))


@pytest.mark.parametrize("name", BACKBONES)
def test_training_with_dropout_leaves_the_frozen_weights_bitwise_unchanged_and_evaluates_without_it(name, request):
    backbone = request.getfixturevalue(name)
    data = reviews_data(backbone)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    cfg = TrainConfig(model=backbone.name, dropout=0.3, max_steps=3, eval_every=3, batch_size=4)
    result = train(cfg, backbone, data)
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
    no_dropout = train(cfg.replace(dropout=0.0), backbone, data)
    assert not torch.equal(result["prompt"], no_dropout["prompt"])  # the training path saw the masks
    kept = PromptedModel(backbone, SoftPrompt(result["prompt"]))
    assert result["best_dev_accuracy"] == evaluate(kept, data, "dev")["accuracy"]  # the report scores without masks
    assert result["test_accuracy"] == evaluate(kept, data, "test")["accuracy"]


class Interrupted(Exception):
    pass


def test_a_run_with_dropout_resumed_midway_ends_bitwise_where_an_uninterrupted_one_does(tiny_llama, tmp_path):
    data = reviews_data(tiny_llama)
    cfg = TrainConfig(model=tiny_llama.name, dropout=0.3, max_steps=4, eval_every=2, batch_size=4)
    straight = train(cfg, tiny_llama, data)

    def stop_at_2(metrics, save):
        save(tmp_path)
        raise Interrupted

    with pytest.raises(Interrupted):
        train(cfg, tiny_llama, data, report=stop_at_2)
    resumed = train(cfg, tiny_llama, data, resume_from=tmp_path)
    assert torch.equal(resumed.pop("prompt"), straight.pop("prompt"))
    assert resumed == straight


def test_a_custom_space_may_search_dropout_parameter_scaling_and_steps_per_decay(tiny_llama_dir):
    space = {"dropout": {"choices": [0.0, 0.1]}, "parameter_scaling": {"choices": [False, True]},
             "decay_factor": {"choices": [0.1, 0.5]}, "decay_fraction": {"choices": [0.2, 0.4]}}
    assert search_config({"space": space, "train": {"model": str(tiny_llama_dir)}}).space == space


@pytest.mark.parametrize("values, field, allowed", [
    ({"optimizer": "adamw", "parameter_scaling": True}, "parameter_scaling", "false with optimizer adamw"),
    ({"parameter_scaling": "yes"}, "parameter_scaling", "true or false"),
    ({"dropout": 1.0}, "dropout", "a finite number >= 0 and < 1"),
    ({"decay_steps": 0}, "decay_steps", "an integer >= 1 or null"),
])
def test_bad_new_training_fields_are_named_with_what_is_allowed(values, field, allowed):
    with pytest.raises(ConfigError) as caught:
        train_config(values)
    assert f"{field} = " in str(caught.value) and allowed in str(caught.value)


def test_parameter_scaling_drawn_beside_adamw_leaves_adamw_as_it_is():
    prompt = torch.nn.Parameter(torch.zeros(4, 8))
    optimizer, _ = build_optimizer("adamw", prompt, 0.03, 1e-5, warmup_steps=0, decay_factor=None, max_steps=10,
                                   parameter_scaling=True)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 0.03


# ---- span corruption + sentinel ----

@pytest.fixture(scope="module")
def sentinel_t5(smollm2_tokenizer, tmp_path_factory):
    """A tiny random T5 whose tokenizer has T5's first sentinel (SmolLM2's vocabulary plus <extra_id_0>)."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from softprompt.models.backbone import load_backbone

    folder = tmp_path_factory.mktemp("sentinel-t5")
    smollm2_tokenizer.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": [SENTINEL]})
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    # served and trained scores compared to 1e-5
    return load_backbone(str(folder), "float32", device=torch.device("cpu"))


def sentinel_data(backbone, sentinel: bool):
    inputs = [f"review: a film that was {'good ' * (i % 5)}and long #{i}\nsentiment:" for i in range(40)]
    task = Task("reviews", ["negative", "positive"], split_three(inputs, [i % 2 for i in range(40)]))
    return encode_task(task, backbone.tokenizer, True, backbone.vocab_is_frequency_ordered, 64, sentinel=sentinel)


def test_with_sentinel_every_target_starts_with_t5s_first_sentinel_and_class_label_init_leaves_it_out(sentinel_t5):
    from softprompt.trainables.loop import initial_prompt

    plain, marked = sentinel_data(sentinel_t5, False), sentinel_data(sentinel_t5, True)
    sentinel_id = sentinel_t5.tokenizer.convert_tokens_to_ids(SENTINEL)
    assert sentinel_id != sentinel_t5.tokenizer.unk_token_id
    assert marked.target_ids == [[sentinel_id] + ids for ids in plain.target_ids]
    cfg = TrainConfig(model=sentinel_t5.name, init="class_label", prompt_length=4)
    assert torch.equal(initial_prompt(cfg, sentinel_t5, marked), initial_prompt(cfg, sentinel_t5, plain))


def test_a_sentinel_run_trains_on_sentinel_targets_and_its_export_serves_them(sentinel_t5, tmp_path):
    from softprompt.models.checkpoint import save_checkpoint
    from softprompt.search.export import write_bundle
    from softprompt.serving.ensemble import load_bundle
    from softprompt.trainables.loop import checkpoint_meta

    marked = sentinel_data(sentinel_t5, True)
    cfg = TrainConfig(model=sentinel_t5.name, sentinel=True, max_steps=3, eval_every=3, batch_size=4, prompt_length=4)
    result = train(cfg, sentinel_t5, marked)
    without = train(cfg.replace(sentinel=False), sentinel_t5, sentinel_data(sentinel_t5, False))
    assert not torch.equal(result["prompt"], without["prompt"])  # the loss saw the sentinel
    save_checkpoint(tmp_path / "trial", result["prompt"], checkpoint_meta(cfg, sentinel_t5, marked, 3, {}))
    ensemble, record = load_bundle(write_bundle({"reviews": [tmp_path / "trial"]}, tmp_path / "bundle"), sentinel_t5)
    assert record["tasks"]["reviews"]["sentinel"] is True
    inputs = marked.splits["dev"].input_ids[:5]
    served = torch.stack([s[0] for s in ensemble.member_scores(["reviews"] * 5, inputs)])
    trained = PromptedModel(sentinel_t5, SoftPrompt(result["prompt"])).class_scores(marked, inputs)
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-5)
    plain = PromptedModel(sentinel_t5, SoftPrompt(result["prompt"])).class_scores(
        sentinel_data(sentinel_t5, False), inputs)
    assert not torch.allclose(plain, trained)  # the sentinel is in what is scored


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_t5_dir"])
def test_sentinel_on_a_model_that_cannot_take_it_is_one_line_and_exit_2(model, request, tmp_path, capsys):
    import yaml

    from softprompt.cli.main import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": str(request.getfixturevalue(model)), "task": "rotten_tomatoes",
                                      "sentinel": True, "max_steps": 2, "output_dir": str(tmp_path / "out")}))
    capsys.readouterr()  # what building the model fixture printed
    code = main(["train", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("softprompt: error: sentinel = True is not allowed: ")
    assert ("encoder-decoder" if "llama" in model else SENTINEL) in err[0]


def test_a_search_with_sentinel_on_a_causal_lm_is_refused_before_any_trial(tiny_llama_dir):
    from softprompt.errors import UserError

    for values in ({"train": {"model": str(tiny_llama_dir), "sentinel": True}},
                   {"train": {"model": str(tiny_llama_dir)}, "space": {"sentinel": {"choices": [False, True]}}}):
        with pytest.raises(UserError, match="sentinel = True is not allowed: an encoder-decoder"):
            search_config(values)


def test_the_paper_space_s_default_point_steps_at_the_papers_lr_0_3_on_a_t5_1_1_shaped_model(smollm2_tokenizer,
                                                                                            tmp_path):
    """Whatever unit the paper space draws its lr in, its default point must give T5 1.1 (token embeddings of
    std about 11.6, N(0, 1)-initialised and not scaled at the input) the paper's lr 0.3."""
    from transformers import T5Config, T5ForConditionalGeneration

    from softprompt.models.backbone import load_backbone
    from softprompt.trainables.config import trial_config

    tok = smollm2_tokenizer
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False,  # T5 1.1's shape
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.shared.weight.normal_(0.0, 11.6)
    model.save_pretrained(tmp_path / "t5-1.1")
    tok.save_pretrained(tmp_path / "t5-1.1")
    backbone = load_backbone(str(tmp_path / "t5-1.1"), "float32", device=torch.device("cpu"))
    study = optuna.create_study()
    study.enqueue_trial(DEFAULT_POINTS["paper"])
    trial = study.ask()
    params = {**trial.params, **paper(trial, [backbone.name])}
    base = TrainConfig(model=backbone.name, batch_size=2, max_steps=1, eval_every=1, max_eval_examples=2,
                       max_test_examples=2).to_dict()
    cfg = trial_config(params, base)
    task = Task("t", ["negative", "positive"],
                split_three([f"text {i}" for i in range(40)], [i % 2 for i in range(40)]))
    data = encode_task(task, backbone.tokenizer, True, backbone.vocab_is_frequency_ordered, 32)
    reports = []
    train(cfg.replace(prompt_length=4), backbone, data, report=lambda metrics, save: reports.append(metrics),
          score_test=False)
    assert cfg.optimizer == "adafactor" and reports[0]["lr_absolute"] == pytest.approx(0.3, rel=0.02)
