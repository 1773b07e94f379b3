"""One dataset reader: a task mapping's `dataset` and lm-adapt's `--corpus` accept the same
`save_to_disk` folders and the same data files, so a corpus that lm-adapt reads is never refused as
a task's data, nor the other way round. Local data only, written here with `datasets`."""
from __future__ import annotations

import json

import datasets
import pytest

from softprompt.adaptation.corpus import open_corpus
from softprompt.errors import ConfigError
from softprompt.models.tasks import FILE_SUFFIXES, TaskError, Where, dataset_task, read_dataset

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

TEXTS = [f"a {'moving' if i % 2 else 'tedious'} film, number {i}" for i in range(30)]
ROWS = [{"text": text, "label": i % 2} for i, text in enumerate(TEXTS)]


@pytest.fixture(autouse=True)
def no_bars():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def read_corpus(source: str) -> list[str]:
    """The texts lm-adapt streams from `source`, in the order its workers read them."""
    return [row["text"] for row in open_corpus(source)]


def task_texts(source: str) -> list[str]:
    """The texts a task mapping over `source` reads, as its train split holds them."""
    return list(read_dataset({"dataset": source}, Where(repr(source), mapping=True))["train"]["text"])


@pytest.mark.parametrize("kind", ["Dataset", "DatasetDict"])
def test_a_save_to_disk_folder_is_a_task_and_a_corpus_alike(kind, tmp_path):
    rows = datasets.Dataset.from_list(ROWS)
    (rows if kind == "Dataset" else datasets.DatasetDict({"train": rows})).save_to_disk(str(tmp_path / "saved"))
    source = str(tmp_path / "saved")
    task = dataset_task({"dataset": source, "template": "{text}", "verbalizers": ["dull", "moving"]})
    assert sorted(x for split in task.splits.values() for x in split["input"]) == sorted(TEXTS)
    assert task_texts(source) == read_corpus(source) == TEXTS


def write(path, kind: str) -> None:
    rows = datasets.Dataset.from_list(ROWS)
    if kind == "text":
        path.write_text("\n".join(TEXTS) + "\n")
    elif kind == "csv":
        rows.to_csv(str(path), index=False)
    elif kind == "parquet":
        rows.to_parquet(str(path))
    else:  # .jsonl: JSON lines; .json: one JSON list
        path.write_text("\n".join(map(json.dumps, ROWS)) if path.suffix == ".jsonl" else json.dumps(ROWS))


@pytest.mark.parametrize("suffix", list(FILE_SUFFIXES))
def test_every_data_file_kind_is_read_by_a_task_and_by_lm_adapt_alike(suffix, tmp_path):
    path = tmp_path / f"reviews{suffix}"
    write(path, FILE_SUFFIXES[suffix])
    assert task_texts(str(path)) == read_corpus(str(path)) == TEXTS
    folder = tmp_path / "folder"  # a folder of such files: its files' names name the splits
    folder.mkdir()
    write(folder / f"train{suffix}", FILE_SUFFIXES[suffix])
    assert task_texts(str(folder)) == read_corpus(str(folder)) == TEXTS


def test_a_folder_of_data_files_beside_a_dataset_info_is_read_as_data_files_by_both(tmp_path):
    """Only dataset_dict.json or state.json make a save_to_disk folder, as datasets itself decides."""
    write(tmp_path / "train.csv", "csv")
    (tmp_path / "dataset_info.json").write_text("{}")
    assert task_texts(str(tmp_path)) == read_corpus(str(tmp_path)) == TEXTS


def test_a_save_to_disk_folder_missing_a_file_is_refused_by_both_as_one(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "dataset_info.json").unlink()
    with pytest.raises(TaskError, match="could not be read as a save_to_disk folder"):
        task_texts(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match="could not be read as a save_to_disk folder"):
        read_corpus(str(tmp_path / "saved"))
