"""Malformed input, through the real `softprompt` entry point: every mistake is answered before any
trial starts by one line on stderr naming what is wrong and what is allowed, exit code 2, and no
traceback unless `--debug` asks for one. The hub is offline here, as it is on the machines we test on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml

from softprompt.cli.main import main
from softprompt.models.checkpoint import save_checkpoint
from softprompt.search.config import _has_cxx
from softprompt.search.export import export_npy

ROOT = Path(__file__).resolve().parents[1]
GOOD_ROWS = "".join(f"{'good' if i % 2 else 'bad'} film number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(30))


def search_file(ctx, change: dict) -> list[str]:
    """`search run` on a valid tiny search with `change` applied (a `train` mapping is merged)."""
    values = {"name": "bad", "trials": 2, "max_steps": 4, "storage_path": str(ctx.tmp / "runs"),
              "train": {"model": str(ctx.model), "task": "rotten_tomatoes", "eval_every": 2}}
    for key, value in change.items():
        values[key] = {**values["train"], **value} if key == "train" else value
    path = ctx.tmp / "search.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["search", "run", str(path), "--tracking-uri", "none"]


def train_file(ctx, change: dict) -> list[str]:
    path = ctx.tmp / "train.yaml"
    path.write_text(yaml.safe_dump({"model": str(ctx.model), "task": "rotten_tomatoes", "max_steps": 2,
                                    "output_dir": str(ctx.tmp / "out"), **change}))
    return ["train", str(path)]


def task_file(ctx, text: str, suffix: str = ".csv", **train) -> list[str]:
    """A search whose task is a data file holding `text`."""
    path = ctx.tmp / f"task{suffix}"
    path.write_text(text)
    return search_file(ctx, {"train": {"task": str(path), **train}})


def task_mapping(ctx, empty_test: bool = False, **spec) -> list[str]:
    """A search whose task is a mapping over a `datasets` folder (train / validation / test, ClassLabel
    labels), a stand-in for a hub dataset."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    rows = datasets.Dataset.from_dict({"text": [f"{'good' if i % 2 else 'bad'} film number {i}" for i in range(30)],
                                       "label": [i % 2 for i in range(30)]}, features)
    datasets.disable_progress_bars()
    try:
        test = rows.filter(lambda row: False) if empty_test else rows.select(range(5, 10))
        datasets.DatasetDict({"train": rows, "validation": rows.select(range(5)), "test": test}).save_to_disk(
            str(ctx.tmp / "reviews"))
    finally:
        datasets.enable_progress_bars()
    return search_file(ctx, {"train": {"task": {"dataset": str(ctx.tmp / "reviews"), **spec}}})


def raw_file(ctx, text: str, encoding: str = "utf-8") -> list[str]:
    path = ctx.tmp / "raw.yaml"
    path.write_bytes(text.encode(encoding))
    return ["search", "run", str(path)]


def random_parquet(ctx) -> list[str]:
    """A `.parquet` task file of random bytes."""
    path = ctx.tmp / "task.parquet"
    path.write_bytes(bytes(range(256)) * 8)
    return search_file(ctx, {"train": {"task": str(path)}})


def foreign_prompt(ctx) -> list[str]:
    """A prompt trained on the tiny Llama, checked against the tiny T5."""
    folder = save_checkpoint(ctx.tmp / "prompt", torch.randn(3, 32), {"backbone": str(ctx.model),
                                                                       "fingerprint": ctx.fingerprint})
    return ["verify", str(folder), "--model", str(ctx.other_model)]


def foreign_npy(ctx) -> list[str]:
    folder = save_checkpoint(ctx.tmp / "prompt", torch.randn(3, 32), {"backbone": str(ctx.model),
                                                                       "fingerprint": ctx.fingerprint})
    return ["verify", str(export_npy(folder, ctx.tmp / "prompt.npy")), "--model", str(ctx.other_model)]


S, T = search_file, train_file
# (id, argv builder, fragments the one line must contain: the field or file, the value, what is allowed)
CASES = [
    # search configs
    ("unknown-field", lambda c: S(c, {"trails": 4}), ["trails", "did you mean 'trials'"]),
    ("scheduler", lambda c: S(c, {"scheduler": "hyperband"}), ["scheduler = 'hyperband'", "one of asha, none"]),
    ("trials-0", lambda c: S(c, {"trials": 0}), ["trials = 0", "an integer >= 1"]),
    ("trials--1", lambda c: S(c, {"trials": -1}), ["trials = -1", "an integer >= 1"]),
    ("metric", lambda c: S(c, {"metric": "accuracy"}),
     ["metric = 'accuracy'", "best_dev_accuracy, best_dev_f1, dev_accuracy"]),
    ("sampler", lambda c: S(c, {"sampler": "grid"}), ["sampler = 'grid'", "one of tpe, random"]),
    ("sampler-unknown", lambda c: S(c, {"sampler": "cmaes"}), ["sampler = 'cmaes'", "one of tpe, random, grid"]),
    ("grid-range", lambda c: S(c, {"sampler": "grid", "space": {"lr": {"low": 0.01, "high": 0.3}}}),
     ["sampler = 'grid'", "every parameter lists choices", "space.lr has a range"]),
    ("grid-when", lambda c: S(c, {"sampler": "grid", "space": {"optimizer": {"choices": ["adamw"]}, "weight_decay": {
        "choices": [0.1], "when": {"optimizer": "adamw"}}}}), ["sampler = 'grid'", "space.weight_decay has when:"]),
    ("grid-trials", lambda c: S(c, {"sampler": "grid", "space": {"prompt_length": {"choices": [2, 4, 6]}}}),
     ["trials = 2", "3, the number of grid cells"]),
    ("seeds-0", lambda c: S(c, {"seeds": 0}), ["seeds = 0", "an integer >= 1"]),
    ("shared-backbone-text", lambda c: S(c, {"shared_backbone": "yes"}), ["shared_backbone = 'yes'", "true or false"]),
    ("shared-backbone-gpus", lambda c: S(c, {"shared_backbone": True, "gpus_per_trial": 2}),
     ["gpus_per_trial = 2", "at most 1 with shared_backbone: true"]),
    ("compile-text", lambda c: S(c, {"train": {"compile": "yes"}}), ["compile = 'yes'", "true or false"]),
    ("compile-shared", lambda c: S(c, {"shared_backbone": True, "train": {"compile": True}}),
     ["compile = True", "false with shared_backbone: true" if _has_cxx() else "needs a C++ compiler"]),
    ("compile-in-space", lambda c: S(c, {"space": {"compile": {"choices": [False, True]}}}),
     ["space.compile = 'compile'", "compiling is search-wide (train.compile)"]),
    ("train-compile-number", lambda c: T(c, {"compile": 1}), ["compile = 1", "true or false"]),
    ("startup-trials-0", lambda c: S(c, {"startup_trials": 0}), ["startup_trials = 0", "an integer >= 1 or null"]),
    ("startup-trials-random", lambda c: S(c, {"startup_trials": 3, "sampler": "random"}),
     ["startup_trials = 3", "null with sampler: random"]),
    ("seeds-text", lambda c: S(c, {"seeds": "three"}), ["seeds = 'three'", "an integer >= 1"]),
    ("seeds-and-seed-space", lambda c: S(c, {"seeds": 2, "space": {"seed": {"choices": [1, 2]}}}),
     ["space.seed", "left out with seeds > 1"]),
    ("concurrency-float", lambda c: S(c, {"concurrency": 1.5}), ["concurrency = 1.5", "an integer >= 1"]),
    ("grace-period", lambda c: S(c, {"grace_period": 50}), ["grace_period = 50", "at most max_steps (4)"]),
    ("max-failures", lambda c: S(c, {"max_failures": -1}), ["max_failures = -1", "an integer >= 0"]),
    ("time-limit-0", lambda c: S(c, {"time_limit_s": 0}), ["time_limit_s = 0", "a finite number > 0"]),
    ("name", lambda c: S(c, {"name": "../escape"}), ["name = '../escape'", "letters, digits"]),
    ("budget-in-train", lambda c: S(c, {"train": {"max_steps": 9}}), ["train.max_steps", "top-level max_steps"]),
    ("prompt-length-0", lambda c: S(c, {"train": {"prompt_length": 0}}),
     ["train.prompt_length = 0", "an integer >= 1"]),
    ("prompt-length--1", lambda c: S(c, {"train": {"prompt_length": -1}}),
     ["train.prompt_length = -1", "an integer >= 1"]),
    ("lr-0", lambda c: S(c, {"train": {"lr": 0}}), ["train.lr = 0", "a finite number > 0"]),
    ("lr-text", lambda c: S(c, {"train": {"lr": "fast"}}), ["train.lr = 'fast'", "a finite number > 0"]),
    ("lr-nan", lambda c: S(c, {"train": {"lr": float("nan")}}), ["train.lr = nan", "a finite number > 0"]),
    ("batch-size-0", lambda c: S(c, {"train": {"batch_size": 0}}), ["train.batch_size = 0", "an integer >= 1"]),
    ("init", lambda c: S(c, {"train": {"init": "zeros"}}), ["train.init = 'zeros'", "one of random_uniform"]),
    ("init-text", lambda c: S(c, {"train": {"init": "text"}}),
     ["train.init_text", "a non-empty string when init is text"]),
    ("optimizer", lambda c: S(c, {"train": {"optimizer": "sgd"}}),
     ["train.optimizer = 'sgd'", "one of adafactor, adamw"]),
    ("eval-mode", lambda c: S(c, {"train": {"eval_mode": "greedy"}}), ["train.eval_mode = 'greedy'", "one of rank"]),
    ("model-offline", lambda c: S(c, {"train": {"model": "no-such-org/no-such-model"}}),
     ["train.model = 'no-such-org/no-such-model'", "hub cannot be reached",
      "an offline alias (smollm2-135m, gemma3-270m)"]),
    ("model-folder", lambda c: S(c, {"train": {"model": "./no-such-model"}}),
     ["train.model = './no-such-model'", "no such folder", "a local model folder with config.json"]),
    ("model-no-config", lambda c: S(c, {"train": {"model": str(c.tmp)}}), ["train.model", "no config.json"]),
    ("checkpoint-offline", lambda c: S(c, {"checkpoints": [str(c.model), "google/t5-xxl-lm-adapt"]}),
     ["checkpoints = 'google/t5-xxl-lm-adapt'", "hub cannot be reached"]),
    ("checkpoints-empty", lambda c: S(c, {"checkpoints": []}), ["checkpoints = []", "a non-empty list"]),
    ("one-checkpoint-not-the-model", lambda c: S(c, {"checkpoints": [str(c.other_model)]}),
     ["checkpoints", "the same model as train.model"]),
    ("space-name", lambda c: S(c, {"space": "huge"}), ["space = 'huge'", "quick, paper, or a mapping"]),
    ("space-unknown-param", lambda c: S(c, {"space": {"label_smoothing": {"choices": [0.1]}}}),
     ["space.label_smoothing", "a training field"]),
    ("space-init", lambda c: S(c, {"space": {"init": {"choices": ["zeros"]}}}),
     ["space.init.choices", "one of random_uniform"]),
    ("space-optimizer", lambda c: S(c, {"space": {"optimizer": {"choices": ["sgd"]}}}),
     ["space.optimizer.choices = 'sgd'", "one of adafactor, adamw"]),
    ("space-length-0", lambda c: S(c, {"space": {"prompt_length": {"choices": [0, 5]}}}),
     ["space.prompt_length.choices = 0", "an integer >= 1"]),
    ("space-length--1", lambda c: S(c, {"space": {"prompt_length": {"low": -1, "high": 5, "int": True}}}),
     ["space.prompt_length = -1", "an integer >= 1"]),
    ("space-lr-0", lambda c: S(c, {"space": {"lr": {"choices": [0, 0.1]}}}),
     ["space.lr.choices = 0", "a finite number > 0"]),
    ("space-log-low-0", lambda c: S(c, {"space": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}), ["space.lr", "> 0"]),
    ("space-low-high", lambda c: S(c, {"space": {"lr": {"low": 0.1, "high": 0.01}}}), ["space.lr", "low < high"]),
    ("space-when-below", lambda c: S(c, {"space": {"lr": {"low": 1e-4, "high": 0.1, "when": {"optimizer": "adamw"}},
                                                   "optimizer": {"choices": ["adamw"]}}}),
     ["space.lr.when", "parameters defined above it"]),
    ("space-choices-empty", lambda c: S(c, {"space": {"init": {"choices": []}}}),
     ["space.init.choices = []", "a non-empty list"]),
    # task names and files
    ("task-name", lambda c: S(c, {"train": {"task": "imdb"}}),
     ["train.task = 'imdb'", "one of rotten_tomatoes", ".csv"]),
    ("task-file-missing", lambda c: S(c, {"train": {"task": str(c.tmp / "nope.csv")}}),
     ["train.task", "nope.csv", "an existing data file"]),
    ("task-no-text-column", lambda c: task_file(c, "sentence,label\n" + GOOD_ROWS),
     ["task.csv", "no column 'text'", "columns are ['sentence', 'label']"]),
    ("task-no-label-column", lambda c: task_file(c, "text,polarity\n" + GOOD_ROWS),
     ["task.csv", "no column 'label'", "set text_column / label_column"]),
    ("task-wrong-column-option", lambda c: task_file(c, "text,label\n" + GOOD_ROWS, text_column="review"),
     ["task.csv", "no column 'review'"]),
    ("task-empty-text", lambda c: task_file(c, "text,label\n" + GOOD_ROWS + ",pos\n"),
     ["task.csv, row 31", "empty 'text'", "every row needs a non-empty text"]),
    ("task-empty-label", lambda c: task_file(c, "text,label\n" + GOOD_ROWS + "a fine film,\n"),
     ["task.csv, row 31", "label None is not one of ['neg', 'pos']"]),
    ("task-mislabeled", lambda c: task_file(c, "text,label\n" + GOOD_ROWS + "a fine film,neutral\n",
                                            verbalizers={"neg": "negative", "pos": "positive"}),
     ["task.csv, row 31", "label 'neutral' is not one of ['neg', 'pos']"]),
    ("task-one-class", lambda c: task_file(c, "text,label\n" + "".join(f"film {i},pos\n" for i in range(30))),
     ["task.csv", "at least 2 classes", "['pos']"]),
    ("task-too-few-rows", lambda c: task_file(c, "text,label\na,pos\nb,neg\nc,pos\n"),
     ["task.csv", "too few", "need 10+"]),
    ("task-header-only", lambda c: task_file(c, "text,label\n"), ["task.csv", "corresponds to no data", "a readable"]),
    ("task-empty-file", lambda c: task_file(c, ""), ["task.csv", "could not be read as csv", "allowed: a readable"]),
    ("task-bad-jsonl", lambda c: task_file(c, '{"text": "a", "label": "pos"}\n{not json\n', ".jsonl"),
     ["task.jsonl", "could not be read as json"]),
    ("task-parquet-random-bytes", random_parquet, ["task.parquet", "could not be read as parquet"]),
    # task mappings: a datasets folder, files or a hub id, with splits, template and verbalizers
    ("task-template-column", lambda c: task_mapping(c, template="review: {review}\nsentiment:"),
     ["train.task.template", "names column 'review'", "its columns: ['text', 'label']"]),
    ("task-split-missing", lambda c: task_mapping(c, splits={"dev": "valid"}),
     ["train.task.splits.dev", "no split 'valid'", "its splits: ['train', 'validation', 'test']"]),
    ("task-label-outside-verbalizers", lambda c: task_mapping(c, verbalizers={"positive": "good", "neutral": "meh"}),
     ["train.task.label_column", "split 'train', row 1", "label 0 ('negative') is not one of ['neutral', 'positive']"]),
    ("task-empty-split", lambda c: task_mapping(c, empty_test=True),
     ["train.task.splits.test", "split 'test'", "no rows"]),
    ("task-hub-unreachable", lambda c: S(c, {"train": {"task": {"dataset": "no-such-org/no-such-dataset"}}}),
     ["train.task.dataset", "'no-such-org/no-such-dataset'",
      "neither in datasets' cache here nor reachable on the hub"]),
    ("task-mapping-unknown-key", lambda c: task_mapping(c, templte="{text}"),
     ["train.task.templte", "did you mean 'template'"]),
    ("task-mapping-no-dataset", lambda c: S(c, {"train": {"task": {"template": "{text}"}}}),
     ["train.task.dataset = None", "a hub dataset id, a save_to_disk folder"]),
    ("task-mapping-and-text-column", lambda c: S(c, {"train": {"task": {"dataset": "x"}, "text_column": "review"}}),
     ["train.text_column = 'review'", "left out with a task mapping: set task.template"]),
    ("max-test-examples-0", lambda c: S(c, {"train": {"max_test_examples": 0}}),
     ["train.max_test_examples = 0", "an integer >= 1"]),
    ("verbalizers-one", lambda c: S(c, {"train": {"verbalizers": {"pos": "positive"}}}),
     ["train.verbalizers", "a mapping of 2+ label values"]),
    # the files and arguments around the config
    ("config-missing", lambda c: ["search", "run", str(c.tmp / "absent.yaml")],
     ["config file", "an existing YAML file"]),
    ("config-bad-yaml", lambda c: raw_file(c, "trials: [4\n"), ["config file", "valid YAML"]),
    ("config-not-mapping", lambda c: raw_file(c, "- trials\n- 4\n"), ["config file", "a YAML mapping"]),
    ("config-utf16", lambda c: raw_file(c, "trials: 4\n", "utf-16"), ["config file", "a UTF-8 text file"]),
    ("config-utf8-bom-is-read", lambda c: raw_file(c, "trials: 0\n", "utf-8-sig"), ["trials = 0", "an integer >= 1"]),
    ("storage-ftp", lambda c: S(c, {"storage_path": "ftp://host/x"}),
     ["storage_path = 'ftp://host/x'", "a storage URI"]),
    ("storage-s3-no-bucket", lambda c: S(c, {"storage_path": "s3://"}), ["storage_path = 's3://'", "a storage URI"]),
    ("set-no-equals", lambda c: [*S(c, {}), "--set", "trials"], ["--set = 'trials'", "key=value"]),
    ("set-bad-value", lambda c: [*S(c, {}), "--set", "trials=many"], ["trials = 'many'", "an integer >= 1"]),
    ("tracking-uri", lambda c: [*S(c, {})[:-2], "--tracking-uri", "ftp://host"],
     ["--tracking-uri = 'ftp://host'", "sqlite:///PATH, http(s)://HOST:PORT"]),
    ("tracking-uri-credentials", lambda c: [*S(c, {})[:-2], "--tracking-uri", "https://alice:hunter2@mlflow.example.com"],
     ["--tracking-uri = 'https://***@mlflow.example.com'", "without credentials", "MLFLOW_TRACKING_PASSWORD"]),
    ("submit-tracking-uri-credentials",  # refused before any connection: Ray would keep it in the job's command
     lambda c: ["submit", S(c, {"storage_path": "/mnt/shared/runs"})[2], "--address", "http://127.0.0.1:9",
                "--tracking-uri", "https://alice:hunter2@mlflow.example.com"],
     ["--tracking-uri = 'https://***@mlflow.example.com'", "without credentials"]),
    ("train-length--1", lambda c: T(c, {"prompt_length": -1}), ["prompt_length = -1", "an integer >= 1"]),
    ("train-lr-0", lambda c: T(c, {"lr": 0.0}), ["lr = 0.0", "a finite number > 0"]),
    ("train-optimizer", lambda c: T(c, {"optimizer": "lion"}), ["optimizer = 'lion'", "one of adafactor, adamw"]),
    ("train-model-offline", lambda c: T(c, {"model": "meta-llama/Llama-9-1T"}),
     ["model = 'meta-llama/Llama-9-1T'", "offline"]),
    ("resume-unknown", lambda c: ["search", "resume", "ghost", "--storage-path", str(c.tmp)],
     ["search name = 'ghost'", "a search under"]),
    ("status-unknown", lambda c: ["search", "status", "ghost", "--storage-path", str(c.tmp)],
     ["search name = 'ghost'", "a search under"]),
    ("report-unknown", lambda c: ["search", "report", "ghost", "--storage-path", str(c.tmp)],
     ["search name = 'ghost'", "a search under"]),
    ("export-no-source", lambda c: ["export", "--format", "npy"], ["export source", "a search name or --run RUN_ID"]),
    ("export-top-peft", lambda c: ["export", "s", "--top", "3", "--format", "peft"], ["--top = 3", "--format mlflow"]),
    # prompts that belong to another backbone, or are not there
    ("wrong-backbone-checkpoint", foreign_prompt, ["prompt", "trained on backbone", "not on this one"]),
    ("wrong-backbone-npy", foreign_npy, ["prompt.npy", "trained on backbone", "not on this one"]),
    ("verify-missing", lambda c: ["verify", str(c.tmp / "gone.npy")], ["gone.npy", "no such file or folder"]),
    ("verify-not-a-prompt", lambda c: (c.tmp / "notes.txt").write_text("hi") and ["verify", str(c.tmp / "notes.txt")],
     ["notes.txt", "not a prompt export", "allowed: a .npy file with its .json"]),
]


class Context:
    def __init__(self, tmp: Path, model: Path, other_model: Path, fingerprint: str):
        self.tmp, self.model, self.other_model, self.fingerprint = tmp, model, other_model, fingerprint


@pytest.fixture
def ctx(tmp_path, tiny_llama_dir, tiny_t5_dir, tiny_llama, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    monkeypatch.chdir(tmp_path)  # a refused command must leave nothing in the checkout, even by accident
    return Context(tmp_path, tiny_llama_dir, tiny_t5_dir, tiny_llama.fingerprint)


def test_the_table_holds_at_least_30_distinct_malformed_inputs():
    assert len(CASES) >= 30 and len({case_id for case_id, _, _ in CASES}) == len(CASES)
    print(f"FIGURE bad input: {len(CASES)} malformed inputs in the table")


@pytest.mark.parametrize("argv,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_gets_one_line_naming_what_is_wrong_and_what_is_allowed(ctx, capfd, argv, fragments):
    code = main(argv(ctx))
    out, err = capfd.readouterr()  # what libraries write to the process's own stderr too
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("softprompt: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in out + err and out == ""
    print(f"FIGURE refused, exit 2: {lines[0]}")  # `pytest -rP ... | grep FIGURE` lists every refusal


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`softprompt ARGS` in a process of its own, running this checkout's code wherever `cwd` is."""
    return subprocess.run([sys.executable, "-m", "softprompt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})


def test_a_bad_task_file_is_refused_end_to_end_without_a_traceback_and_debug_shows_one(tmp_path, tiny_llama_dir):
    task = tmp_path / "reviews.csv"
    task.write_text("text,label\n" + GOOD_ROWS + "a fine film,neutral\n")
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({"storage_path": str(tmp_path / "runs"), "train": {
        "model": str(tiny_llama_dir), "task": str(task), "verbalizers": {"neg": "negative", "pos": "positive"}}}))
    plain = cli("search", "run", str(config), "--tracking-uri", "none", cwd=tmp_path)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.strip().splitlines() == [
        f"softprompt: error: task file {task}, row 31: label 'neutral' is not one of ['neg', 'pos'] "
        f"(the verbalizers' labels)"]
    assert not (tmp_path / "runs").exists()  # refused before the search existed

    debug = cli("--debug", "search", "run", str(config), "--tracking-uri", "none", cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "TaskError: task file" in debug.stderr.strip().splitlines()[-1]


def test_a_parquet_task_of_random_bytes_gets_softprompts_line_alone(tmp_path, tiny_llama_dir):
    """pyarrow's complaint, which datasets logs, is not printed before it (in pytest's own process its
    logging plugin takes the record, so this runs the command in a process of its own)."""
    task = tmp_path / "reviews.parquet"
    task.write_bytes(bytes(range(256)) * 8)
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({"storage_path": str(tmp_path / "runs"),
                                      "train": {"model": str(tiny_llama_dir), "task": str(task)}}))
    done = cli("search", "run", str(config), "--tracking-uri", "none", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and done.stdout == "" and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"softprompt: error: task file {task} could not be read as parquet")


def test_a_config_refused_for_its_own_fields_is_refused_before_torch_and_ray_are_imported(tmp_path):
    """They take seconds to import: a typo must not."""
    config = tmp_path / "search.yaml"
    config.write_text("trials: 0\n")
    check = (f"import sys; from softprompt.cli.main import main; code = main(['search', 'run', {str(config)!r}]); "
             f"print(sorted({{'torch', 'ray', 'transformers', 'datasets'}} & set(sys.modules))); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "[]\n", (done.stdout, done.stderr)
    assert "trials = 0 is not allowed" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU share this machine has")
def test_a_gpu_share_on_a_machine_without_gpus_is_refused_before_the_search_is_announced(tmp_path, tiny_llama_dir):
    """Not after an opening line that says bfloat16 for a GPU, nor after Ray's token-auth notice."""
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({"trials": 1, "max_steps": 2, "gpus_per_trial": 0.5,
                                      "storage_path": str(tmp_path / "runs"),
                                      "train": {"model": str(tiny_llama_dir), "task": "rotten_tomatoes"}}))
    done = cli("search", "run", str(config), "--tracking-uri", "none", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.strip().splitlines() == [
        "softprompt: error: gpus_per_trial = 0.5 is not allowed: at most 0, the most GPUs one node of this local Ray "
        "has, and it cannot add nodes (a trial runs on one node)"]
    assert not (tmp_path / "runs" / "search").exists()  # refused before the search existed: the name is free
