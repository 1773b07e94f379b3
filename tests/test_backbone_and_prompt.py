"""The frozen backbone and the soft prompt in front of it: only the prompt learns, the prompt sits on
the encoder only (T5), padding changes nothing, and evaluation scores what it claims to."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from softprompt.models.backbone import load_backbone
from softprompt.models.data import encode_task, make_batch
from softprompt.models.evaluate import ILLEGAL, auc, exact_match, f1_score, log_loss, rank_classify
from softprompt.models.hub import BackboneError
from softprompt.models.precision import avoid_cudnn_attention
from softprompt.models.prompt import PromptedModel, SoftPrompt, loss
from softprompt.models.tasks import Task, split_three
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import initial_prompt, train

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

BACKBONES = ["tiny_llama", "tiny_t5"]


def reviews(verbalizers=("negative", "positive")) -> Task:
    """A small two-class task with inputs of very different lengths."""
    words = "the film was a long slow and oddly moving story about two brothers who never met".split()
    inputs = [f"review: {' '.join(words[: 2 + (i * 7) % len(words)])} #{i}\nsentiment:" for i in range(40)]
    return Task("reviews", list(verbalizers), split_three(inputs, [i % len(verbalizers) for i in range(40)]))


def encoded(backbone, task=None, max_length=64):
    return encode_task(task or reviews(), backbone.tokenizer, backbone.is_encoder_decoder,
                       backbone.vocab_is_frequency_ordered, max_length)


def prompted(backbone, length=5, seed=0) -> PromptedModel:
    values = torch.randn(length, backbone.width, generator=torch.Generator().manual_seed(seed))
    return PromptedModel(backbone, SoftPrompt(values))


def hand_made_inputs(tokenizer, lengths=(3, 40, 17)) -> list[list[int]]:
    text = ("a short sentence grows longer and longer until it has many many tokens in it, "
            "more than any other input in the batch, which forces lots of padding everywhere ") * 2
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i: i + n] for i, n in enumerate(lengths)]


# ---- the backbone ----

@pytest.mark.parametrize("name", BACKBONES)
def test_loaded_backbone_is_frozen_in_eval_mode(name, request):
    backbone = request.getfixturevalue(name)
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert backbone.width == 32
    assert backbone.is_encoder_decoder == (name == "tiny_t5")
    assert backbone.dtype == torch.float32  # the fixtures pin float32 (tests/conftest.py)


def test_fingerprint_is_stable_across_loads_and_dtypes_but_differs_between_checkpoints(tiny_llama_dir, tiny_llama,
                                                                                       tiny_t5):
    again = load_backbone(str(tiny_llama_dir), dtype="bfloat16", device=torch.device("cpu"))
    assert again.dtype == torch.bfloat16
    assert again.fingerprint == tiny_llama.fingerprint
    assert tiny_t5.fingerprint != tiny_llama.fingerprint


def test_a_backbone_on_cuda_turns_cudnn_attention_off_and_one_on_cpu_leaves_it_alone():
    """cuDNN attention plans every new sequence width anew (bench/results/gpu-attention.txt)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_attention(torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        avoid_cudnn_attention(torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_unknown_model_raises_backbone_error_naming_the_offline_aliases(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(BackboneError,
                       match=re.escape(f"model {missing!r} is neither an offline alias (smollm2-135m, gemma3-270m)")):
        load_backbone(missing)


# ---- only the prompt learns ----

@pytest.mark.parametrize("name", BACKBONES)
def test_frozen_weights_are_bitwise_unchanged_after_training(name, request):
    backbone = request.getfixturevalue(name)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    cfg = TrainConfig(model=backbone.name, max_steps=3, eval_every=3, batch_size=4, max_eval_examples=8)
    data = encoded(backbone)
    result = train(cfg, backbone, data)
    after = backbone.model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    # ... while the prompt itself did move
    assert not torch.equal(result["prompt"], initial_prompt(cfg, backbone, data))


@pytest.mark.parametrize("name", BACKBONES)
def test_only_the_prompt_receives_gradients(name, request):
    backbone = request.getfixturevalue(name)
    data = encoded(backbone)
    pm = prompted(backbone)
    train = data.splits["train"]
    pm.loss(make_batch(data, train.input_ids[:4], train.labels[:4])).backward()
    assert all(p.grad is None for p in backbone.model.parameters())
    grad = pm.prompt.weight.grad
    assert grad is not None and grad.shape == (5, 32)
    assert torch.isfinite(grad).all() and (grad.abs().sum(-1) > 0).all()  # every prompt vector gets a gradient


@pytest.mark.parametrize("name", BACKBONES)
def test_rows_with_own_prompts_of_different_lengths_give_each_group_its_alone_loss_and_gradient(name, request):
    """Several trials in one pass, each with its own prompt: a group's loss and its prompt's gradient
    are what that prompt gets with its rows alone."""
    backbone = request.getfixturevalue(name)
    data, train_split = encoded(backbone), encoded(backbone).splits["train"]
    inputs, classes, groups = train_split.input_ids[:6], train_split.labels[:6], [0, 1, 0, 1, 1, 0]
    prompts = [prompted(backbone, length, seed=length).prompt for length in (3, 7)]
    fused = loss(backbone, [prompts[g].weight for g in groups], make_batch(data, inputs, classes), groups=groups)
    fused.sum().backward()
    for g, prompt in enumerate(prompts):
        alone = PromptedModel(backbone, SoftPrompt(prompt.weight.detach()))
        rows = [i for i, group in enumerate(groups) if group == g]
        expected = alone.loss(make_batch(data, [inputs[i] for i in rows], [classes[i] for i in rows]))
        expected.backward()
        torch.testing.assert_close(fused[g], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prompt.weight.grad, alone.prompt.weight.grad, atol=1e-5, rtol=1e-4)


# ---- where the prompt goes ----

def test_causal_prompt_equals_a_hand_built_prompt_then_text_sequence(tiny_llama):
    """[P; X] by hand: concatenated embeddings, default positions 0..n-1, one unpadded example."""
    data = encoded(tiny_llama)
    pm = prompted(tiny_llama)
    x, target = data.splits["train"].input_ids[0], data.target_ids[1]
    embed = tiny_llama.model.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([pm.prompt.weight, embed(torch.tensor(x + target))]).unsqueeze(0)
        logits = tiny_llama.model(inputs_embeds=embeds).logits[0].log_softmax(-1)
        expected = logits[-len(target) - 1:-1].gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1)
        got = pm.target_logprobs(make_batch(data, [x], [1]))[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", BACKBONES)
def test_a_prompt_made_of_token_embeddings_scores_like_those_tokens_typed_in(name, request):
    backbone = request.getfixturevalue(name)
    data = encoded(backbone)
    prefix = backbone.tokenizer("classify this review", add_special_tokens=False)["input_ids"]
    embed = backbone.model.get_input_embeddings()
    pm = PromptedModel(backbone, SoftPrompt(embed.weight[prefix]))
    train_split = data.splits["train"]
    inputs, classes = train_split.input_ids[:3], [0, 1, 1]
    got = pm.target_logprobs(make_batch(data, inputs, classes))
    typed = PromptedModel(backbone, SoftPrompt(torch.zeros(0, backbone.width)))
    expected = typed.target_logprobs(make_batch(data, [prefix + x for x in inputs], classes))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got[got != 0] < 0).all()


def test_t5_prompt_goes_on_the_encoder_only(tiny_t5):
    data = encoded(tiny_t5)
    pm = prompted(tiny_t5, length=5)
    model = tiny_t5.model
    seen = {}

    def record(part):
        def hook(module, args, kwargs):
            ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
            seen[part] = (ids.shape[1] if ids is not None else None, embeds.shape[1] if embeds is not None else None)
        return hook

    handles = [model.get_encoder().register_forward_pre_hook(record("encoder"), with_kwargs=True),
               model.get_decoder().register_forward_pre_hook(record("decoder"), with_kwargs=True)]
    x = data.splits["train"].input_ids[0]
    batch = make_batch(data, [x], [1])
    try:
        got = pm.target_logprobs(batch)[0]
    finally:
        for handle in handles:
            handle.remove()
    label_length = len(data.target_ids[1])
    assert seen["encoder"] == (None, 5 + len(x))          # [P; X] embeddings
    assert seen["decoder"] == (label_length, None)         # plain decoder ids, as many as the labels
    # the same by hand: prompt on the encoder embeddings, decoder fed [start] + labels[:-1]
    with torch.no_grad():
        embeds = torch.cat([pm.prompt.weight, model.get_input_embeddings()(torch.tensor(x))]).unsqueeze(0)
        decoder_ids = torch.tensor([[model.config.decoder_start_token_id] + data.target_ids[1][:-1]])
        logits = model(inputs_embeds=embeds, decoder_input_ids=decoder_ids).logits[0].log_softmax(-1)
    expected = logits.gather(-1, torch.tensor(data.target_ids[1]).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_t5_changing_the_prompt_changes_the_encoder_output(tiny_t5):
    data = encoded(tiny_t5)
    batch = make_batch(data, data.splits["train"].input_ids[:2], [0, 1])
    encoder_states, scores = [], []
    hook = tiny_t5.model.get_encoder().register_forward_hook(
        lambda module, args, output: encoder_states.append(output.last_hidden_state))
    try:
        for seed in (0, 1):
            scores.append(prompted(tiny_t5, seed=seed).target_logprobs(batch).detach())
    finally:
        hook.remove()
    assert not torch.allclose(encoder_states[0], encoder_states[1], atol=1e-3)
    assert not torch.allclose(scores[0], scores[1], atol=1e-3)  # and through them the decoder's scores


# ---- padding changes nothing ----

@pytest.mark.parametrize("name", BACKBONES)
def test_an_example_scores_the_same_alone_and_inside_a_padded_batch(name, request):
    backbone = request.getfixturevalue(name)
    data = encoded(backbone, reviews(("bad", "very good indeed")))  # targets of different lengths
    pm = prompted(backbone)
    short, long_a, long_b = hand_made_inputs(backbone.tokenizer)
    alone = pm.target_logprobs(make_batch(data, [short], [1])).detach()[0]
    batched = pm.target_logprobs(make_batch(data, [long_a, short, long_b], [0, 1, 0])).detach()[1]
    # labels are right-aligned for causal models, left-aligned for T5; the rest is padding (0)
    same, padding = (batched[-len(alone):], batched[:-len(alone)]) if not backbone.is_encoder_decoder \
        else (batched[:len(alone)], batched[len(alone):])
    torch.testing.assert_close(same, alone, atol=1e-5, rtol=0)
    assert (padding == 0).all()
    scores_alone = pm.class_scores(data, [short])
    scores_batched = pm.class_scores(data, [long_a, short, long_b])
    torch.testing.assert_close(scores_batched[1], scores_alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(scores_batched[0], scores_batched[1], atol=1e-3)  # the scores do depend on the input


def test_single_token_fast_path_is_padding_invariant_too(tiny_llama):
    data = encoded(tiny_llama)
    assert data.single_token_targets
    pm = prompted(tiny_llama)
    short, long_a, long_b = hand_made_inputs(tiny_llama.tokenizer)
    torch.testing.assert_close(pm.class_scores(data, [long_a, short, long_b])[1], pm.class_scores(data, [short])[0],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", BACKBONES)
def test_greedy_generation_is_the_same_alone_and_batched(name, request):
    backbone = request.getfixturevalue(name)
    data = encoded(backbone)
    pm = prompted(backbone)
    short, long_a, long_b = hand_made_inputs(backbone.tokenizer)
    alone = pm.generate(data, [short], max_new_tokens=4)
    batched = pm.generate(data, [long_a, short, long_b], max_new_tokens=4)
    assert len(alone[0]) == 4
    assert batched[1] == alone[0]


# ---- evaluation ----

def brute_force_scores(pm, data, inputs):
    """Each (example, class) pair scored on its own through target_logprobs."""
    return torch.tensor([[pm.target_logprobs(make_batch(data, [x], [c])).sum().item()
                          for c in range(len(data.target_ids))] for x in inputs])


@pytest.mark.parametrize("name", BACKBONES)
def test_rank_classification_with_multi_token_verbalizers_equals_brute_force(name, request):
    backbone = request.getfixturevalue(name)
    data = encoded(backbone, reviews(("quite bad really", "good", "a masterpiece of cinema")))
    assert not data.single_token_targets
    pm = prompted(backbone)
    split = data.splits["dev"]
    expected = brute_force_scores(pm, data, split.input_ids)
    torch.testing.assert_close(pm.class_scores(data, split.input_ids), expected, atol=1e-4, rtol=0)
    predictions = rank_classify(pm, data, split, batch_size=3)  # several length-sorted chunks
    assert predictions.tolist() == expected.argmax(-1).tolist()


def test_single_token_fast_path_equals_the_general_path(tiny_llama):
    data = encoded(tiny_llama)
    assert data.single_token_targets
    pm = prompted(tiny_llama)
    inputs = data.splits["dev"].input_ids
    torch.testing.assert_close(pm.class_scores(data, inputs), brute_force_scores(pm, data, inputs),
                               atol=1e-4, rtol=0)


class ScriptedModel:
    """Stands in for a PromptedModel whose greedy continuations are fixed strings."""

    def __init__(self, backbone, continuations):
        self.backbone, self.continuations = backbone, continuations

    def generate(self, data, inputs, max_new_tokens):
        return [self.backbone.tokenizer(self.continuations[len(x)], add_special_tokens=False)["input_ids"]
                for x in inputs]


def test_exact_match_maps_each_continuation_to_its_class_or_to_illegal(tiny_llama):
    data = encoded(tiny_llama)
    split = data.splits["dev"]
    split = type(split)([[7] * n for n in (1, 2, 3, 4)], [1, 0, 1, 0])
    continuations = {1: " positive\nreview:", 2: " negative", 3: " positively", 4: "<|im_end|>"}
    predictions = exact_match(ScriptedModel(tiny_llama, continuations), data, split, batch_size=2)
    assert predictions.tolist() == [1, 0, ILLEGAL, ILLEGAL]


def test_f1_is_the_positive_class_f1_for_binary_and_macro_f1_otherwise():
    labels = np.array([1, 1, 1, 0, 0, 0])
    predictions = np.array([1, 1, 0, 1, 0, 0])  # positive class: tp 2, fp 1, fn 1
    assert f1_score(predictions, labels, 2) == pytest.approx(2 / 3)
    assert f1_score(np.zeros(6, dtype=int), labels, 2) == 0.0  # never predicting the positive class
    labels3 = np.array([0, 0, 1, 1, 2, 2])
    predictions3 = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp 1, 2 predicted, 2 true -> 0.5; class 1: tp 2, 3 predicted, 2 true -> 0.8; class 2: 1/(1+2)*2 -> 2/3
    assert f1_score(predictions3, labels3, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert f1_score(labels3, labels3, 3) == 1.0


def test_auc_counts_correctly_ordered_pairs_and_ignores_a_shift_of_every_score():
    labels = np.array([1, 1, 0, 0, 0])
    scores = np.array([[0, 1.0], [0, 2.0], [0, -1.0], [0, 0.5], [0, 1.0]])  # class-1 margins
    # positive margins 1 and 2 against negatives -1, 0.5, 1: 5 pairs right, one tie (1 vs 1) counts 1/2
    assert auc(scores, labels) == pytest.approx(5.5 / 6)
    shifted = scores + np.array([0, -10.0])  # every example now predicted class 0: accuracy 0.6, AUC unchanged
    assert np.mean(shifted.argmax(-1) == labels) == pytest.approx(0.6)
    assert auc(shifted, labels) == pytest.approx(5.5 / 6)
    assert auc(scores[:, ::-1], labels) == pytest.approx(0.5 / 6)  # the margins reversed
    # three classes: each class's log-odds against the rest, averaged; perfect ranking gives 1
    labels3 = np.array([0, 1, 2, 2])
    assert auc(np.eye(3)[labels3] * 3.0, labels3) == 1.0
    assert np.isnan(auc(scores, np.ones(5, dtype=int)))  # one class only: no pair to order


def test_f1_and_auc_agree_with_sklearn_on_random_predictions_and_tied_scores():
    """The metrics are written in numpy (sklearn's import is ~0.8 s of every trial's start); sklearn,
    installed for Optuna's importances, is the reference."""
    from sklearn import metrics
    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 5):
        for _ in range(100):
            labels, predictions = rng.integers(0, n_classes, (2, int(rng.integers(2, 40))))
            classes = [1] if n_classes == 2 else list(range(n_classes))
            assert f1_score(predictions, labels, n_classes) == pytest.approx(
                metrics.f1_score(labels, predictions, labels=classes, average="macro", zero_division=0.0))
            scores = rng.integers(0, 4, (len(labels), n_classes)).astype(float)  # many ties
            present = [c for c in range(n_classes) if 0 < np.sum(labels == c) < len(labels)]
            expected = np.mean([metrics.roc_auc_score(labels == c, scores[:, c] - np.logaddexp.reduce(
                np.delete(scores, c, axis=1), axis=1)) for c in present]) if present else np.nan
            assert auc(scores, labels) == pytest.approx(expected, nan_ok=True)


def test_log_loss_renormalises_the_class_scores_over_the_classes():
    labels = np.array([1, 0])
    scores = np.log(np.array([[0.1, 0.3], [0.02, 0.06]]))  # both renormalise to (0.25, 0.75)
    assert log_loss(scores, labels) == pytest.approx(-(np.log(0.75) + np.log(0.25)) / 2)
