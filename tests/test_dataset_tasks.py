"""Tasks as mappings: a `datasets` folder with its own splits and a template over its columns, a
folder of split files, a single file; the hub presets are such mappings; the test split is scored
whole unless capped. Stand-ins for the hub: `save_to_disk` folders and data files, read by the real
code (a hub id goes through `datasets.load_dataset`)."""
from __future__ import annotations

import os

import datasets
import pytest
import yaml

from softprompt.cli.main import main
from softprompt.models.tasks import TaskError, dataset_task, file_task, load_task
from softprompt.search.config import train_config
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import DataSpec, checkpoint_meta, prepare_data, train

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

SENTIMENT = datasets.ClassLabel(names=["negative", "positive"])
REVIEW = datasets.Features({"text": datasets.Value("string"), "label": SENTIMENT})
ANSWER = datasets.ClassLabel(names=["False", "True"])
BOOLQ = datasets.Features({"question": datasets.Value("string"), "passage": datasets.Value("string"),
                           "idx": datasets.Value("int32"), "label": ANSWER})


def reviews(start: int, n: int) -> list[dict]:
    return [{"text": f" review {i}: a {'moving' if i % 2 else 'tedious'} film ", "label": i % 2}
            for i in range(start, start + n)]


def boolq(start: int, n: int) -> list[dict]:
    return [{"question": f"is {i} even", "passage": f"{i} is a number.", "idx": i, "label": int(i % 2 == 0)}
            for i in range(start, start + n)]


def save(folder, splits: dict[str, list[dict]], features: datasets.Features) -> str:
    datasets.disable_progress_bars()  # a bar per save is noise
    try:
        datasets.DatasetDict({name: datasets.Dataset.from_list(rows, features=features)
                              for name, rows in splits.items()}).save_to_disk(str(folder))
    finally:
        datasets.enable_progress_bars()
    return str(folder)


@pytest.fixture
def review_folder(tmp_path):
    """A sentiment dataset with its own train / validation / test splits and ClassLabel labels."""
    return save(tmp_path / "reviews",
                {"train": reviews(0, 40), "validation": reviews(100, 12), "test": reviews(200, 17)},
                REVIEW)


def test_a_datasets_folder_keeps_its_own_splits_and_takes_verbalizers_from_its_class_label(review_folder):
    task = load_task({"dataset": review_folder, "template": "review: {text}\nsentiment:"})
    assert task.name == "reviews" and task.verbalizers == ["negative", "positive"]
    assert {name: len(split) for name, split in task.splits.items()} == {"train": 40, "dev": 12, "test": 17}
    assert list(task.splits["test"]["input"]) == [f"review: review {i}: a {'moving' if i % 2 else 'tedious'} film\n"
                                                  f"sentiment:" for i in range(200, 217)]  # in order, values stripped
    assert list(task.splits["dev"]["label"]) == [i % 2 for i in range(100, 112)]
    assert task.template == "review: {text}\nsentiment:"


def test_a_two_column_template_formats_each_row_as_boolq_is_formatted(tmp_path):
    folder = save(tmp_path / "boolq", {"train": boolq(0, 30), "validation": boolq(50, 10)}, BOOLQ)
    spec = {"dataset": folder, "splits": {"dev": None, "test": "validation"},
            "template": "question: {question} passage: {passage}\nanswer:",
            "verbalizers": {"False": "no", "True": "yes"}}
    task = load_task(spec)
    assert task.verbalizers == ["no", "yes"]
    assert task.splits["test"][0] == {"input": "question: is 50 even passage: 50 is a number.\nanswer:", "label": 1}
    assert list(task.splits["test"]["label"]) == [int(i % 2 == 0) for i in range(50, 60)]
    # a list of verbalizers names class i by the ClassLabel's i-th name
    assert load_task({**spec, "verbalizers": ["no", "yes"]}).splits["test"][:] == task.splits["test"][:]


def test_without_a_template_each_text_column_is_named_before_its_value_and_the_label_is_the_cue(tmp_path):
    folder = save(tmp_path / "boolq", {"train": boolq(0, 30), "test": boolq(50, 4)}, BOOLQ)
    task = load_task({"dataset": folder})
    assert task.template == "question: {question} passage: {passage}\nlabel:"  # idx is no text column
    assert task.splits["test"][0]["input"] == "question: is 50 even passage: 50 is a number.\nlabel:"


def write_files(folder, splits: dict[str, list[dict]], suffix: str = ".csv") -> str:
    folder.mkdir()
    for name, rows in splits.items():
        frame = datasets.Dataset.from_list([{**r, "label": ["neg", "pos"][r["label"]]} for r in rows])
        path = str(folder / f"{name}{suffix}")
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_json(path)
    return str(folder)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_folder_of_train_dev_test_files_keeps_its_splits(tmp_path, suffix):
    folder = write_files(tmp_path / "reviews",
                         {"train": reviews(0, 30), "dev": reviews(100, 6), "test": reviews(200, 9)},
                         suffix)
    task = load_task({"dataset": folder, "template": "{text}\nsentiment:",
                      "verbalizers": {"neg": "bad", "pos": "good"}})
    assert {name: len(split) for name, split in task.splits.items()} == {"train": 30, "dev": 6, "test": 9}
    assert task.verbalizers == ["bad", "good"]
    assert task.splits["dev"][:] == {"input": [f"review {i}: a {'moving' if i % 2 else 'tedious'} film\nsentiment:"
                                               for i in range(100, 106)], "label": [i % 2 for i in range(100, 106)]}


def test_a_single_file_is_split_80_10_10_as_a_task_file_is(tmp_path):
    folder = write_files(tmp_path / "data", {"reviews": reviews(0, 60)})
    path = os.path.join(folder, "reviews.csv")
    mapped = load_task({"dataset": path, "template": "text: {text}\nlabel:"})
    named = file_task(path)
    assert mapped.name == named.name == "reviews" and mapped.verbalizers == named.verbalizers == ["neg", "pos"]
    assert {s: mapped.splits[s][:] for s in mapped.splits} == {s: named.splits[s][:] for s in mapped.splits}
    assert {s: len(mapped.splits[s]) for s in mapped.splits} == {"train": 48, "dev": 6, "test": 6}
    glob = load_task({"dataset": os.path.join(folder, "*.csv"), "template": "text: {text}\nlabel:"})
    assert glob.name == "data" and ({s: glob.splits[s][:] for s in glob.splits}
                                    == {s: named.splits[s][:] for s in glob.splits})


def test_a_missing_dev_split_is_carved_from_train_seeded_and_disjoint(tmp_path):
    folder = save(tmp_path / "reviews", {"train": reviews(0, 50), "test": reviews(200, 10)}, REVIEW)
    first, second = (load_task({"dataset": folder, "template": "{text}"}) for _ in range(2))
    assert {s: len(first.splits[s]) for s in first.splits} == {"train": 45, "dev": 5, "test": 10}
    assert first.splits["dev"][:] == second.splits["dev"][:]
    train, dev = set(first.splits["train"]["input"]), set(first.splits["dev"]["input"])
    assert not train & dev and train | dev == {r["text"].strip() for r in reviews(0, 50)}
    assert list(first.splits["test"]["input"]) == [r["text"].strip() for r in reviews(200, 10)]  # whole, in order


def test_a_hub_id_is_read_by_load_dataset_with_its_config_and_revision(review_folder):
    calls = []

    def load_dataset(path, config, **kwargs):  # the hub, played by a save_to_disk folder
        calls.append((path, config, kwargs))
        return datasets.load_from_disk(review_folder)

    task = dataset_task({"dataset": "someone/movie-reviews", "config": "binary", "revision": "v1.0",
                         "template": "{text}"}, load_dataset)
    assert calls == [("someone/movie-reviews", "binary", {"revision": "v1.0"})]
    assert task.name == "movie-reviews/binary" and len(task.splits["test"]) == 17


def test_hidden_test_labels_are_refused_naming_the_field_split_and_row(tmp_path):
    folder = save(tmp_path / "glue", {"train": reviews(0, 30), "test": [{"text": "unlabelled", "label": -1}]}, REVIEW)
    with pytest.raises(TaskError, match=r"^task\.label_column: '.*glue' split 'test', row 1: label -1 is not one of "
                                        r"\['negative', 'positive'\].*hidden label") as error:
        load_task({"dataset": folder})
    assert error.value.field == "label_column"


def test_equal_task_mappings_have_one_cache_key_whatever_their_key_order():
    a = {"dataset": "d", "splits": {"train": "train", "test": "validation"}, "template": "{text}"}
    b = {"template": "{text}", "splits": {"test": "validation", "train": "train"}, "dataset": "d"}
    key = {DataSpec.of(TrainConfig(task=a)): "cached"}
    assert key.get(DataSpec.of(TrainConfig(task=b))) == "cached"
    assert DataSpec.of(TrainConfig(task={**a, "template": "{text}!"})) not in key


def test_a_task_mapping_config_survives_yaml_and_its_local_dataset_becomes_absolute(review_folder, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train_config({"task": {"dataset": "reviews", "template": "{text}", "splits": {"dev": None}}})
    assert cfg.task == {"dataset": review_folder, "template": "{text}", "splits": {"dev": None}}
    assert TrainConfig(**yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_the_test_split_is_scored_whole_unless_max_test_examples_caps_it(review_folder, tiny_llama):
    cfg = TrainConfig(model=tiny_llama.name, task={"dataset": review_folder, "template": "review: {text}\nsentiment:"},
                      batch_size=4, max_steps=2, eval_every=2, max_eval_examples=5, prompt_length=2,
                      init="random_uniform")
    data = prepare_data(cfg, tiny_llama)
    assert (len(data.splits["dev"]), len(data.splits["test"])) == (5, 17)
    assert train(cfg, tiny_llama, data)["test_examples"] == 17
    capped = cfg.replace(max_test_examples=6)
    assert train(capped, tiny_llama, prepare_data(capped, tiny_llama))["test_examples"] == 6


def test_a_prompt_checkpoint_carries_its_template_and_verbalizers(review_folder, tiny_llama):
    cfg = TrainConfig(model=tiny_llama.name, task={"dataset": review_folder, "template": "review: {text}\nsentiment:"})
    data = prepare_data(cfg, tiny_llama)
    meta = checkpoint_meta(cfg, tiny_llama, data, 0, {})
    assert (meta["task"], meta["template"], meta["verbalizers"]) == ("reviews", "review: {text}\nsentiment:",
                                                                     ["negative", "positive"])
    assert meta["config"]["task"] == cfg.task


def test_softprompt_train_on_a_task_mapping_prints_its_splits_template_and_how_many_test_examples_it_scored(
        review_folder, tiny_llama_dir, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "max_steps": 2, "eval_every": 2, "batch_size": 4,
                                      "prompt_length": 2, "init": "random_uniform", "output_dir": str(tmp_path / "out"),
                                      "task": {"dataset": review_folder, "template": "review: {text}\nsentiment:"}}))
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "task reviews: train 40, dev 12, test 17; verbalizers ['negative', 'positive']; " \
           "template 'review: {text}\\nsentiment:'" in out
    assert "(test split: 17 examples, best dev step 2)" in out
