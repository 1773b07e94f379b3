"""Export: PEFT adapters with identical logits, bare .npy prompts, ensembles that equal the
majority vote of their members, mixed-task batches, backbone checks, and a registered MLflow
model served over HTTP by a real `mlflow models serve`."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from conftest import free_port

import softprompt.serving.ensemble
from softprompt.models.backbone import load_backbone
from softprompt.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from softprompt.models.data import encode_task, verbalizer_ids
from softprompt.models.evaluate import rank_classify
from softprompt.models.hub import OFFLINE_MODELS
from softprompt.models.prompt import PromptedModel, SoftPrompt, cache_kwarg, prompted_inputs, returned_cache
from softprompt.models.tasks import format_input, load_task
from softprompt.search.export import export_mlflow_model, export_npy, export_peft_adapter, write_bundle
from softprompt.serving.ensemble import PromptEnsemble, TaskPrompts, length_groups, load_bundle

TASKS = {"rotten_tomatoes": ["negative", "positive"], "sms_spam": ["ham", "spam"]}
TEMPLATES = {"rotten_tomatoes": "review: {text}\nsentiment:", "sms_spam": "message: {text}\nspam:"}


def save_tiny(folder: Path, kind: str, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(OFFLINE_MODELS["smollm2-135m"]())
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=512, tie_word_embeddings=True))
    else:
        eos = tokenizer.eos_token_id
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=16,
                                                    num_layers=2, num_heads=2, pad_token_id=eos, eos_token_id=eos,
                                                    decoder_start_token_id=eos))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_t5_dir):
    return {"llama": tiny_llama_dir, "t5": tiny_t5_dir}


@pytest.fixture(scope="module")
def backbones(tiny_llama, tiny_t5):
    return {"llama": tiny_llama, "t5": tiny_t5}


def make_prompt(folder: Path, backbone, task: str, length: int, seed: int) -> Path:
    values = torch.randn(length, backbone.width, generator=torch.Generator().manual_seed(seed)) * 0.5
    return save_checkpoint(folder, values, {"backbone": backbone.name, "fingerprint": backbone.fingerprint,
                                            "task": task, "template": TEMPLATES[task], "verbalizers": TASKS[task],
                                            "step": 0, "metrics": {},
                                            "config": {"max_length": 256}})


def encoded(backbone, task: str, n: int = 24):
    raw = load_task(task)
    data = encode_task(raw, backbone.tokenizer, backbone.is_encoder_decoder, backbone.vocab_is_frequency_ordered,
                       256, 64, n, max_test=n)
    return data, list(raw.splits["test"]["input"][:n])


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_peft_round_trip_gives_identical_logits(kind, models, tmp_path):
    from peft import PeftModel

    backbone = load_backbone(str(models[kind]), "float32", torch.device("cpu"))  # PEFT wraps it: not shared
    prompt_dir = make_prompt(tmp_path / "prompt", backbone, "rotten_tomatoes", 5, seed=1)
    adapter = export_peft_adapter(prompt_dir, tmp_path / "adapter")
    prompt = load_checkpoint(prompt_dir).prompt
    ids = backbone.tokenizer(["review: a fine film\nsentiment:", "review: dull and long\nsentiment:"],
                             return_tensors="pt", padding=True)
    assert ids["attention_mask"].all()  # equal lengths: PEFT's own forward does not handle padding positions
    embeds, mask = prompted_inputs(backbone, prompt, ids["input_ids"], ids["attention_mask"])
    decoder = {"decoder_input_ids": torch.tensor([[backbone.model.config.decoder_start_token_id, 5]] * 2)} \
        if kind == "t5" else {}
    with torch.no_grad():
        ours = backbone.model(inputs_embeds=embeds, attention_mask=mask, **decoder).logits
        peft_model = PeftModel.from_pretrained(backbone.model, str(adapter))
        theirs = peft_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], **decoder).logits
    assert torch.equal(ours, theirs)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["num_transformer_submodules"] == 1 and config["num_virtual_tokens"] == 5
    provenance = json.loads((adapter / "softprompt.json").read_text())
    assert provenance["fingerprint"] == backbone.fingerprint
    assert (provenance["template"], provenance["verbalizers"]) == (TEMPLATES["rotten_tomatoes"],
                                                                   TASKS["rotten_tomatoes"])


def test_npy_export_is_the_bare_prompt_array_with_its_backbone_recorded_beside_it(backbones, tmp_path):
    backbone = backbones["llama"]
    prompt_dir = make_prompt(tmp_path / "prompt", backbone, "rotten_tomatoes", 4, seed=2)
    out = export_npy(prompt_dir, tmp_path / "prompt.npy")
    array = np.load(out, allow_pickle=False)
    assert array.shape == (4, backbone.width) and array.dtype == np.float32
    assert np.array_equal(array, load_checkpoint(prompt_dir).prompt.numpy())
    assert json.loads(out.with_suffix(".json").read_text())["fingerprint"] == backbone.fingerprint


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_ensemble_equals_the_majority_vote_of_its_members_predictions(kind, backbones, tmp_path):
    backbone = backbones[kind]
    members = [make_prompt(tmp_path / f"m{i}", backbone, "rotten_tomatoes", 3 + i, seed=10 + i) for i in range(3)]
    ensemble, _ = load_bundle(write_bundle({"rotten_tomatoes": members}, tmp_path / "bundle"), backbone)
    data, _ = encoded(backbone, "rotten_tomatoes")
    split = data.splits["test"]
    alone = [rank_classify(PromptedModel(backbone, SoftPrompt(load_checkpoint(m).prompt)), data, split, 8)
             for m in members]
    vote = [Counter(column).most_common(1)[0][0] for column in zip(*alone, strict=True)]  # 3 voters, 2 classes: no ties
    together = ensemble.predict(["rotten_tomatoes"] * len(split), split.input_ids)
    assert [label for label, _ in together] == vote
    # causal LMs serve from the prompts' cached keys and values (prompts of 3, 4, 5 vectors: padded)
    assert (ensemble.prefixes is not None) == (kind == "llama")
    member_scores = ensemble.member_scores(["rotten_tomatoes"] * 4, split.input_ids[:4])
    for i, m in enumerate(members):  # each member scores in the batch as it does alone
        single = PromptedModel(backbone, SoftPrompt(load_checkpoint(m).prompt)).class_scores(data, split.input_ids[:4])
        torch.testing.assert_close(torch.stack([s[i] for s in member_scores]), single, atol=1e-5, rtol=1e-5)


def test_length_groups_cover_every_request_once_and_bound_the_padding():
    lengths, members = [10, 50, 12, 48, 11, 30, 31, 9], [5, 5, 5, 5, 2, 2, 5, 5]
    groups = length_groups(lengths, members, min_tokens=0, waste=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [lengths[g[0]] for g in groups] == sorted(lengths[g[0]] for g in groups)  # shortest first
    for g in groups:  # each group's padding to its longest is within a quarter of its real tokens
        padded = max(lengths[i] for i in g) * sum(members[i] for i in g)
        assert padded <= 1.25 * sum(lengths[i] * members[i] for i in g)
    assert groups == [[7, 0, 4, 2], [5, 6], [3, 1]]
    # a group may not close before it holds min_tokens real tokens: one pass for a small batch
    assert length_groups(lengths, members, min_tokens=10_000) == [[7, 0, 4, 2, 5, 6, 3, 1]]
    assert length_groups([], [], min_tokens=0) == []


@pytest.mark.parametrize("min_tokens", [0, 10_000])
def test_requests_grouped_by_length_score_as_one_pass_does_in_request_order(min_tokens, backbones, monkeypatch):
    backbone = backbones["llama"]
    data, _ = encoded(backbone, "rotten_tomatoes", 8)
    prompts = [torch.randn(n, backbone.width, generator=torch.Generator().manual_seed(n)) * 0.5 for n in (2, 5, 3)]
    ensemble = PromptEnsemble(backbone, {"rt": TaskPrompts(TASKS["rotten_tomatoes"], data.target_ids, prompts)})
    inputs = data.splits["test"].input_ids
    assert len({len(x) for x in inputs}) > 2  # lengths differ, so min_tokens=0 splits the batch
    monkeypatch.setitem(softprompt.serving.ensemble.MIN_PASS_TOKENS, "cpu", min_tokens)
    scores = ensemble.member_scores(["rt"] * len(inputs), inputs)
    for i, prompt in enumerate(prompts):
        single = PromptedModel(backbone, SoftPrompt(prompt)).class_scores(data, inputs)
        torch.testing.assert_close(torch.stack([s[i] for s in scores]), single, atol=1e-5, rtol=1e-5)


def test_cached_prompts_score_multi_token_verbalizers_as_each_member_does_alone(backbones):
    backbone = backbones["llama"]
    verbalizers = ["a rather negative review", "positive"]  # a row per (example, class), unequal lengths
    base, _ = encoded(backbone, "rotten_tomatoes", 6)
    data = dataclasses.replace(base, verbalizers=verbalizers,
                               target_ids=verbalizer_ids(backbone.tokenizer, verbalizers, False))
    assert not data.single_token_targets
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randn(n, backbone.width, generator=generator) * 0.5 for n in (2, 5)]
    ensemble = PromptEnsemble(backbone, {"rt": TaskPrompts(verbalizers, data.target_ids, prompts)})
    assert ensemble.prefixes is not None
    inputs = data.splits["test"].input_ids
    scores = ensemble.member_scores(["rt"] * len(inputs), inputs)
    for i, prompt in enumerate(prompts):
        single = PromptedModel(backbone, SoftPrompt(prompt)).class_scores(data, inputs)
        torch.testing.assert_close(torch.stack([s[i] for s in scores]), single, atol=1e-4, rtol=1e-4)


def test_a_batch_with_an_empty_input_scores_it_from_the_prompt_alone(backbones):
    backbone = backbones["llama"]
    data, _ = encoded(backbone, "rotten_tomatoes", 3)
    prompts = [torch.randn(n, backbone.width, generator=torch.Generator().manual_seed(n)) * 0.5 for n in (3, 4)]
    ensemble = PromptEnsemble(backbone, {"rt": TaskPrompts(TASKS["rotten_tomatoes"], data.target_ids, prompts)})
    assert ensemble.prefixes is not None  # built, but such a batch runs without it
    verbalizer_tokens = [t[0] for t in data.target_ids]
    for inputs in ([[], *data.splits["test"].input_ids[:2]], [[], []]):  # one empty row; all empty
        scores = ensemble.member_scores(["rt"] * len(inputs), inputs)
        for i, prompt in enumerate(prompts):
            with torch.no_grad():  # an empty input: the verbalizer follows the prompt's last vector
                alone = backbone.model(inputs_embeds=prompt[None]).logits[0, -1].log_softmax(-1)
            torch.testing.assert_close(scores[0][i], alone[verbalizer_tokens], atol=1e-5, rtol=1e-5)
            if len(inputs) > 2:
                single = PromptedModel(backbone, SoftPrompt(prompt)).class_scores(data, inputs[1:])
                torch.testing.assert_close(torch.stack([s[i] for s in scores[1:]]), single, atol=1e-5, rtol=1e-5)


def test_a_sliding_window_model_serves_without_cached_prompts_and_scores_right(tmp_path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(OFFLINE_MODELS["smollm2-135m"]())
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    backbone = load_backbone(str(tmp_path / "qwen"), "float32", device=torch.device("cpu"))  # compared to 1e-5
    assert "sliding_attention" in backbone.model.config.layer_types
    data, _ = encoded(backbone, "rotten_tomatoes", 4)
    prompts = [torch.randn(n, backbone.width, generator=torch.Generator().manual_seed(n)) * 0.5 for n in (3, 6)]
    ensemble = PromptEnsemble(backbone, {"rt": TaskPrompts(TASKS["rotten_tomatoes"], data.target_ids, prompts)})
    assert ensemble.prefixes is None  # a window over the prompt's keys is not what a full cache gives
    inputs = data.splits["test"].input_ids
    scores = ensemble.member_scores(["rt"] * len(inputs), inputs)
    for i, prompt in enumerate(prompts):
        single = PromptedModel(backbone, SoftPrompt(prompt)).class_scores(data, inputs)
        torch.testing.assert_close(torch.stack([s[i] for s in scores]), single, atol=1e-5, rtol=1e-5)


def test_one_batch_serves_two_tasks_each_example_with_its_own_prompts(backbones, tmp_path):
    backbone = backbones["llama"]
    bundle = write_bundle({"rotten_tomatoes": [make_prompt(tmp_path / "rt", backbone, "rotten_tomatoes", 4, 1)],
                           "sms_spam": [make_prompt(tmp_path / "sms", backbone, "sms_spam", 6, 2)]}, tmp_path / "b")
    ensemble, _ = load_bundle(bundle, backbone)
    rt, sms = encoded(backbone, "rotten_tomatoes", 6)[0], encoded(backbone, "sms_spam", 6)[0]
    tasks = ["rotten_tomatoes", "sms_spam"] * 6
    inputs = [x for pair in zip(rt.splits["test"].input_ids, sms.splits["test"].input_ids, strict=True) for x in pair]
    mixed = ensemble.predict(tasks, inputs)
    assert [label for label, _ in mixed[0::2]] == [label for label, _ in ensemble.predict(tasks[0::2], inputs[0::2])]
    assert [label for label, _ in mixed[1::2]] == [label for label, _ in ensemble.predict(tasks[1::2], inputs[1::2])]
    assert [label for label, _ in mixed[1::2]] == list(rank_classify(
        PromptedModel(backbone, SoftPrompt(ensemble.tasks["sms_spam"].prompts[0])), sms, sms.splits["test"], 4))


def test_a_bundle_refuses_another_backbone_with_a_message_naming_both(backbones, tmp_path):
    prompt = make_prompt(tmp_path / "p", backbones["llama"], "rotten_tomatoes", 2, 0)
    bundle = write_bundle({"rotten_tomatoes": [prompt]}, tmp_path / "b")
    other = load_backbone(str(save_tiny(tmp_path / "other", "llama", seed=7)), "float32", torch.device("cpu"))
    with pytest.raises(CheckpointError, match="trained on backbone .* not on"):
        load_bundle(bundle, other)


def serving_env(uri: str) -> dict:
    """`mlflow models serve` execs `uvicorn` by name: the venv's bin folder must be on PATH even
    when the tests run as .venv/bin/python without an activated venv (as `make test` does)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}


def test_registered_model_served_by_mlflow_applies_the_template_to_raw_text(backbones, tmp_path):
    """Raw text gets the labels (and scores) formatted input got before the template travelled with the
    prompt; formatted input is still scored as formatted, not formatted twice."""
    import mlflow

    backbone = backbones["llama"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bundle = write_bundle({"rotten_tomatoes": [make_prompt(tmp_path / "p", backbone, "rotten_tomatoes", 4, 3)]},
                          tmp_path / "bundle")
    version = export_mlflow_model(bundle, "tiny-sentiment", uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert int(client.get_model_version_by_alias("tiny-sentiment", "production").version) == version
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/tiny-sentiment@production",
                                                         dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    for path in model_dir.rglob("*"):  # no pickle anywhere in the registered model
        assert path.suffix not in {".pkl", ".pickle"}
        assert not (path.is_file() and path.read_bytes()[:1] == b"\x80"), path
    inputs = mlflow.models.Model.load(str(model_dir)).signature.inputs.to_dict()
    assert [(c["name"], c["required"]) for c in inputs] == [("text", True), ("task", False)]

    data, formatted = encoded(backbone, "rotten_tomatoes", 12)
    raw = [text.removeprefix("review: ").removesuffix("\nsentiment:") for text in formatted]
    assert [format_input(TEMPLATES["rotten_tomatoes"], {"text": r}) for r in raw] == formatted
    expected = rank_classify(PromptedModel(backbone, SoftPrompt(load_checkpoint(tmp_path / "p").prompt)), data,
                             data.splits["test"], 8)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve",
                               "-m", "models:/tiny-sentiment@production", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              env=serving_env(uri), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)

    def post(column: str, texts: list[str]) -> requests.Response:
        body = {"dataframe_split": {"columns": [column], "data": [[t] for t in texts]}}
        return requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).ok:
                    break
            except requests.RequestException:  # not up yet
                pass
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 120 s"
            time.sleep(0.5)
        answers = {"raw": post("text", raw), "formatted": post("text", formatted)}
        wrong_column = post("review", raw)
    finally:
        os.killpg(server.pid, 9)  # its own session: the server and its workers
        server.wait(timeout=10)
    assert all(answer.ok for answer in answers.values()), {k: a.text for k, a in answers.items()}
    raw_predictions, formatted_predictions = (answers[k].json()["predictions"] for k in ("raw", "formatted"))
    assert [p["label_id"] for p in raw_predictions] == list(expected)
    assert [p["label"] for p in raw_predictions] == [TASKS["rotten_tomatoes"][i] for i in expected]
    assert raw_predictions == formatted_predictions  # labels and scores alike
    assert all({"score_negative", "score_positive"} <= set(p) for p in raw_predictions)
    assert wrong_column.status_code == 400 and "text" in wrong_column.text  # the signature names the column


def test_the_cache_goes_to_forward_under_the_name_the_model_takes():
    """transformers 5.24 renamed `past_key_values` to `cache`; the project allows 5.23 to 5.x."""
    class Before:
        def forward(self, input_ids=None, past_key_values=None): ...

    class After:
        def forward(self, input_ids=None, cache=None): ...

    assert (cache_kwarg(Before), cache_kwarg(After)) == ("past_key_values", "cache")
    assert returned_cache(SimpleNamespace(past_key_values="kv")) == "kv"
    assert returned_cache(SimpleNamespace(cache="kv", past_key_values=None)) == "kv"


@pytest.mark.parametrize("template", ["sst2 sentence: {sentence}", "{sentence}\nlabel:",
                                      "review: {sentence}\nsentiment:"])
def test_served_input_is_formatted_once_whether_the_request_sends_raw_or_formatted_text(template):
    from softprompt.serving.served_model import request_input

    formatted = template.format(sentence="a fine film")
    assert request_input(template, {"sentence": "a fine film"}, "t", 1) == formatted
    # not "sst2 sentence: sst2 sentence: ..."
    assert request_input(template, {"sentence": formatted}, "t", 1) == formatted


TOPICS = {"sports": "sport", "tech": "technology", "politics": "government", "health": "medicine", "arts": "culture"}


def test_served_model_and_peft_record_answer_in_the_tasks_labels_not_its_verbalizers(backbones, tmp_path):
    """A 5-way topic task from a folder of split files, whose labels (`sports`) are not its verbalizers
    (`sport`): the registered model's `label` and score columns use the labels, `verbalizer` the words,
    for an ensemble beside a task exported before labels travelled (it answers in its verbalizers)."""
    import mlflow
    import pandas as pd

    from softprompt.search.config import train_config
    from softprompt.trainables.loop import checkpoint_meta, prepare_data

    folder = tmp_path / "topics"
    folder.mkdir()
    for split, rows in (("train", 40), ("validation", 10), ("test", 10)):
        labels = [list(TOPICS)[i % len(TOPICS)] for i in range(rows)]
        (folder / f"{split}.csv").write_text("text,label\n" + "".join(f"story {i} about {label},{label}\n"
                                                                      for i, label in enumerate(labels)))
    backbone = backbones["llama"]
    cfg = train_config({"model": str(backbone.name), "task": {"dataset": str(folder), "verbalizers": TOPICS}})
    data = prepare_data(cfg, backbone)
    members = [save_checkpoint(tmp_path / f"topic{seed}", torch.randn(3, backbone.width, generator=torch.Generator()
                                                                      .manual_seed(seed)),
                               checkpoint_meta(cfg, backbone, data, 0, {})) for seed in (1, 2)]
    assert json.loads(export_peft_adapter(members[0], tmp_path / "peft", False).joinpath("softprompt.json")
                      .read_text())["labels"] == list(TOPICS)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bundle = write_bundle({"topics": members, "rotten_tomatoes": [make_prompt(tmp_path / "old", backbone,
                                                                              "rotten_tomatoes", 4, 3)]},
                          tmp_path / "bundle")
    export_mlflow_model(bundle, "topics", uri)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/topics@production")
    outputs = [c["name"] for c in model.metadata.get_output_schema().to_dict()]
    assert outputs == ["task", "label", "label_id", "verbalizer",
                       *(f"score_{label}" for label in sorted([*TOPICS, *TASKS["rotten_tomatoes"]]))]
    answer = model.predict(pd.DataFrame({"text": ["a match", "a phone", "a film", "a bore"],
                                         "task": ["topics", "topics", "rotten_tomatoes", "rotten_tomatoes"]}))
    topics, reviews = answer[answer["task"] == "topics"], answer[answer["task"] == "rotten_tomatoes"]
    assert set(topics["label"]) <= set(TOPICS) and list(topics["verbalizer"]) == [TOPICS[x] for x in topics["label"]]
    assert topics[[f"score_{label}" for label in TOPICS]].notna().all().all()
    assert not {f"score_{word}" for word in TOPICS.values()} & set(answer.columns)
    assert set(reviews["label"]) <= set(TASKS["rotten_tomatoes"])
    assert list(reviews["label"]) == list(reviews["verbalizer"])
