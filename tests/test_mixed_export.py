"""`softprompt export SEARCH1 SEARCH2 --format mlflow`: one registered model that serves the task of
each search, on raw columns, from two real searches on task mappings (`datasets` folders with their
own splits and templates, one with two columns, BoolQ-like)."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import datasets
import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
import torch

from softprompt.cli.main import main
from softprompt.models.checkpoint import load_checkpoint
from softprompt.models.evaluate import split_class_scores
from softprompt.models.prompt import PromptedModel, SoftPrompt
from softprompt.search.config import search_config
from softprompt.search.record import SearchRecord
from softprompt.search.tuner import run_search
from softprompt.trainables.loop import prepare_data

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REVIEW = datasets.Features({"text": datasets.Value("string"),
                            "label": datasets.ClassLabel(names=["negative", "positive"])})
BOOLQ = datasets.Features({"question": datasets.Value("string"), "passage": datasets.Value("string"),
                           "label": datasets.ClassLabel(names=["False", "True"])})
TEMPLATES = {"reviews": "review: {text}\nsentiment:", "boolq": "question: {question} passage: {passage}\nanswer:"}


def save(folder, features: datasets.Features, make_row, sizes: dict[str, int]) -> str:
    start, splits = 0, {}
    for name, n in sizes.items():
        rows = [make_row(i) for i in range(start, start + n)]
        splits[name] = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features)
        start += n
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict(splits).save_to_disk(str(folder))
    finally:
        datasets.enable_progress_bars()
    return str(folder)


@pytest.fixture(scope="module")
def two_searches(ray_cluster, tiny_llama_dir, tmp_path_factory):
    """A finished one-trial search per task: sentiment on `text`, and yes/no on `question` + `passage`."""
    tmp = tmp_path_factory.mktemp("mixed")
    folders = {
        "reviews": save(tmp / "reviews", REVIEW,
                        lambda i: {"text": f"a {'fine' if i % 2 else 'dull'} film, take {i}", "label": i % 2},
                        {"train": 40, "validation": 8, "test": 11}),
        "boolq": save(tmp / "boolq", BOOLQ,
                      lambda i: {"question": f"is {i} even", "passage": f"{i} is a number.", "label": int(i % 2 == 0)},
                      {"train": 40, "validation": 8, "test": 7}),
    }
    configs = {}
    for name, folder in folders.items():
        configs[name] = search_config({
            "name": name, "trials": 1, "max_steps": 2, "scheduler": "none", "concurrency": 1,
            "storage_path": str(tmp / "runs"),
            "train": {"model": str(tiny_llama_dir), "task": {"dataset": folder, "template": TEMPLATES[name]},
                      "batch_size": 4, "eval_every": 2, "prompt_length": 2, "init": "random_uniform",
                      "confirm_examples": 0}})
        run_search(configs[name])
    return configs, folders, tmp


def test_the_driver_scores_the_winner_on_its_whole_test_split_and_says_how_many(two_searches):
    """Trials leave test to the driver: scoring a whole split in every finished trial was waste."""
    from softprompt.search.verdict import judge_winner

    configs, _, _ = two_searches
    for name, test_size in (("reviews", 11), ("boolq", 7)):
        cfg = configs[name]
        record = SearchRecord.load(cfg.storage_path, name)
        (row,) = record.trials
        lines = (record.storage.folder / f"trial_{row['trial_id']}" / "result.json").read_text()
        assert "test_examples" not in json.loads(lines.splitlines()[-1])
        summary, _ = judge_winner(record)
        assert summary["test_examples"] == test_size and summary["test_accuracy"] is not None
        assert load_checkpoint(record.best()["prompt"]).meta["template"] == TEMPLATES[name]


def test_export_of_two_searches_registers_one_model_that_serves_both_tasks_on_raw_columns(two_searches, tiny_llama,
                                                                                         capsys):
    configs, folders, tmp = two_searches
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert main(["export", "reviews", "boolq", "--format", "mlflow", "--name", "mixed", "--out", str(tmp / "bundle"),
                 "--storage-path", str(tmp / "runs"), "--tracking-uri", uri]) == 0
    assert "registered model mixed version 1 (alias production; reviews: 1 prompt(s), boolq: 1 prompt(s)" \
        in capsys.readouterr().out
    bundle = json.loads((tmp / "bundle" / "bundle.json").read_text())
    assert {name: (task["template"], len(task["members"])) for name, task in bundle["tasks"].items()} == \
        {name: (TEMPLATES[name], 1) for name in TEMPLATES}

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/mixed@production")
    columns = {c["name"]: c["required"] for c in model.metadata.get_input_schema().to_dict()}
    assert columns == {"text": False, "question": False, "passage": False, "task": False}  # each needed by one task

    expected, requests = {}, {}
    for name, cfg in list(configs.items())[:2]:  # each prompt alone, on its task's formatted test split
        data = prepare_data(cfg.train, tiny_llama)
        prompt = load_checkpoint(SearchRecord.load(cfg.storage_path, name).best()["prompt"]).prompt
        scores = split_class_scores(PromptedModel(tiny_llama, SoftPrompt(prompt)), data, data.splits["test"], 8)
        expected[name] = ([data.verbalizers[i] for i in scores.argmax(-1)], data.verbalizers, scores)
        test = datasets.load_from_disk(folders[name])["test"].remove_columns("label")
        requests[name] = [{"task": name, **row} for row in test]  # raw columns only
    interleaved = [row for pair in itertools.zip_longest(*requests.values()) for row in pair if row is not None]
    mixed = pd.DataFrame(interleaved)  # one request, the two tasks' rows alternating, each lacking the other's columns
    answer = model.predict(mixed)
    for name, (labels, verbalizers, scores) in expected.items():
        rows = answer[mixed["task"] == name]
        assert list(rows["label"]) == labels
        np.testing.assert_allclose(rows[[f"score_{v}" for v in verbalizers]].to_numpy(), scores, atol=1e-4)


def test_export_refuses_two_searches_of_one_task_and_several_searches_as_a_peft_adapter(two_searches, capsys):
    from softprompt.configfile import ConfigError
    from softprompt.search.export import search_prompts, tasks_by_name

    configs, _, tmp = two_searches
    reviews = search_prompts(SearchRecord.load(configs["reviews"].storage_path, "reviews"))
    with pytest.raises(ConfigError) as same_task:  # a second search of the task: its prompts are on it too
        tasks_by_name({"reviews": reviews, "reviews-again": reviews})
    assert "searches of different tasks; reviews and reviews-again are both on task 'reviews'" in str(same_task.value)
    common = ["--storage-path", str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'refused.db'}",
              "--out", str(tmp / "refused")]
    assert main(["export", "reviews", "boolq", "--format", "peft", *common]) == 2
    assert main(["export", "reviews", "reviews", "--format", "mlflow", *common]) == 2
    out, err = capsys.readouterr()
    peft, twice = err.strip().splitlines()
    assert "export source = ['reviews', 'boolq']" in peft and "one search for --format peft" in peft
    assert "export source = ['reviews', 'reviews']" in twice and "each search once" in twice
    assert out == "" and not (tmp / "refused").exists()


def test_serve_takes_a_search_name_as_its_winner_in_a_bundle(two_searches, tiny_llama, tmp_path, monkeypatch):
    """`softprompt serve SEARCH`: the search's best prompt, as `export` would bundle it (no registry needed)."""
    from softprompt.cli.serve import serve_source
    from softprompt.serving.ensemble import load_bundle

    configs, _, tmp = two_searches
    monkeypatch.chdir(tmp_path)
    source, what = serve_source("boolq", f"sqlite:///{tmp_path / 'none.db'}", str(tmp / "runs"))
    assert what == "search boolq's winner" and Path(source["bundle"]) == tmp_path / "runs" / "serve" / "boolq"
    ensemble, record = load_bundle(Path(source["bundle"]), tiny_llama)
    assert list(record["tasks"]) == ["boolq"] and record["tasks"]["boolq"]["template"] == TEMPLATES["boolq"]
    best = load_checkpoint(SearchRecord.load(configs["boolq"].storage_path, "boolq").best()["prompt"]).prompt
    assert torch.equal(ensemble.tasks["boolq"].prompts[0], best)
    assert not (tmp_path / "none.db").exists()  # a registry that is not there is not created
