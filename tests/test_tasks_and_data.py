"""Tasks (offline, hub with a local stand-in, user files) and how they become batches."""
from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from softprompt.models.data import (
    BUCKET_BATCHES,
    IGNORE,
    EncodedSplit,
    EncodedTask,
    TrainOrder,
    encode_task,
    make_batch,
    train_batch,
)
from softprompt.models.tasks import (
    HUB_TASKS,
    OFFLINE_TASKS,
    TASK_KEYS,
    Task,
    TaskError,
    file_task,
    format_input,
    hub_task,
    load_task,
)

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

EXPECTED_CLASSES = {"rotten_tomatoes": ["negative", "positive"], "sms_spam": ["ham", "spam"],
                    "trec": ["abbreviation", "description", "entity", "human", "location", "numeric"]}


# ---- offline tasks ----

def test_every_offline_task_is_checked_here():
    assert set(OFFLINE_TASKS) == set(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_offline_task_has_deterministic_disjoint_splits_and_its_classes(name):
    first, second = load_task(name), load_task(name)
    assert first.verbalizers == EXPECTED_CLASSES[name]
    assert set(first.splits) == {"train", "dev", "test"}
    for split in first.splits:
        assert list(first.splits[split]["input"]) == list(second.splits[split]["input"])
        assert list(first.splits[split]["label"]) == list(second.splits[split]["label"])
    texts = {split: set(first.splits[split]["input"]) for split in first.splits}
    assert all(len(texts[s]) == len(first.splits[s]) for s in texts)  # no duplicate inside a split either
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    assert len(first.splits["dev"]) == len(first.splits["test"]) > 400
    assert len(first.splits["train"]) > 3000
    for split in first.splits:
        assert set(first.splits[split]["label"]) == set(range(len(EXPECTED_CLASSES[name])))


def test_offline_task_inputs_end_with_the_cue_the_verbalizer_follows():
    task = load_task("rotten_tomatoes")
    row = task.splits["train"][0]
    assert row["input"].startswith("review: ") and row["input"].endswith("\nsentiment:")


# ---- hub tasks, with a local stand-in for datasets.load_dataset ----

GLUE_ROWS = {
    "sst2": lambda i: {"sentence": f"a film numbered {i}", "label": i % 2, "idx": i},
    "rte": lambda i: {"premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "label": i % 2, "idx": i},
}


def fake_load_dataset(calls):
    def load_dataset(path, config):
        calls.append((path, config))
        rows = GLUE_ROWS[config]
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_list([rows(i) for i in range(50)]),
            "validation": datasets.Dataset.from_list([rows(i) for i in range(100, 112)]),
            "test": datasets.Dataset.from_list([{**rows(i), "label": -1} for i in range(200, 210)])})
    return load_dataset


def test_glue_sst2_is_formatted_t5_style_and_its_validation_split_becomes_test():
    calls = []
    task = hub_task("glue/sst2", load_dataset=fake_load_dataset(calls))
    assert calls == [("nyu-mll/glue", "sst2")]
    assert task.verbalizers == ["negative", "positive"]
    assert list(task.splits["test"]["input"]) == [f"sst2 sentence: a film numbered {i}" for i in range(100, 112)]
    assert list(task.splits["test"]["label"]) == [i % 2 for i in range(100, 112)]
    train, dev = task.splits["train"], task.splits["dev"]
    assert len(dev) == 5 and len(train) == 45
    assert sorted([*train["input"], *dev["input"]]) == sorted(f"sst2 sentence: a film numbered {i}" for i in range(50))
    for split in (train, dev):  # labels travel with their sentence
        assert all(int(row["input"].rsplit(" ", 1)[1]) % 2 == row["label"] for row in split)


def test_superglue_rte_formats_premise_then_hypothesis():
    calls = []
    task = hub_task("super_glue/rte", load_dataset=fake_load_dataset(calls))
    assert calls == [("aps/super_glue", "rte")]
    assert task.verbalizers == ["entailment", "not_entailment"]
    assert task.splits["test"][0]["input"] == "rte premise: premise 100 hypothesis: hypothesis 100"


def test_hub_task_splits_are_deterministic():
    first = hub_task("glue/sst2", load_dataset=fake_load_dataset([]))
    second = hub_task("glue/sst2", load_dataset=fake_load_dataset([]))
    assert list(first.splits["dev"]["input"]) == list(second.splits["dev"]["input"])


HUB_FIELDS = {"glue/sst2": ("sentence",), "glue/mrpc": ("sentence1", "sentence2"),
              "glue/qqp": ("question1", "question2"),
              "super_glue/boolq": ("question", "passage"), "super_glue/rte": ("premise", "hypothesis"),
              "super_glue/cb": ("premise", "hypothesis")}


def test_every_hub_task_is_a_task_mapping_that_formats_its_fields_in_order():
    assert set(HUB_TASKS) == set(HUB_FIELDS)
    for name, spec in HUB_TASKS.items():
        assert set(spec) <= set(TASK_KEYS), name
        assert spec["splits"] == {"train": "train", "dev": None, "test": "validation"}, name  # dev: carved from train
        row = {field: f"<{field}>" for field in HUB_FIELDS[name]}
        assert format_input(spec["template"], row) == spec["config"] + "".join(f" {f}: <{f}>" for f in HUB_FIELDS[name])


# ---- file tasks ----

ROWS = [{"text": f"review number {i} says {'great' if i % 2 else 'awful'}", "label": ["neg", "pos"][i % 2]}
        for i in range(30)]


def write(tmp_path, rows, suffix):
    path = tmp_path / f"reviews{suffix}"
    frame = datasets.Dataset.from_list(rows)
    {".csv": lambda: frame.to_csv(str(path), index=False), ".jsonl": lambda: frame.to_json(str(path)),
     ".parquet": lambda: frame.to_parquet(str(path))}[suffix]()
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_file_task_reads_csv_jsonl_and_parquet(tmp_path, suffix):
    task = file_task(str(write(tmp_path, ROWS, suffix)))
    assert task.name == "reviews"
    assert task.verbalizers == ["neg", "pos"]
    rows = {row["input"]: row["label"] for split in task.splits.values() for row in split}
    assert rows == {f"text: {r['text']}\nlabel:": ["neg", "pos"].index(r["label"]) for r in ROWS}
    assert (len(task.splits["dev"]), len(task.splits["test"])) == (3, 3)


def test_file_task_maps_label_values_through_the_given_verbalizers(tmp_path):
    rows = [{"review": r["text"], "stars": 1 + 4 * (r["label"] == "pos")} for r in ROWS]
    task = file_task(str(write(tmp_path, rows, ".csv")), text_column="review", label_column="stars",
                     verbalizers={5: "good", 1: "bad"})
    assert task.verbalizers == ["good", "bad"]
    train = task.splits["train"]
    assert all(("great" in row["input"]) == (row["label"] == 0) for row in train)
    assert train[0]["input"].startswith("review: ") and train[0]["input"].endswith("\nstars:")


@pytest.mark.parametrize("rows, kwargs, message", [
    (ROWS, {"text_column": "review"}, r"no column 'review'; columns are \['text', 'label'\]"),
    (ROWS[:2] + [{"text": "  ", "label": "pos"}] + ROWS[3:], {}, r"row 3: empty 'text'"),
    (ROWS, {"verbalizers": {"neg": "bad", "meh": "okay"}}, r"row 2: label 'pos' is not one of \['neg', 'meh'\]"),
    ([{**r, "label": "pos"} for r in ROWS], {}, r"at least 2 classes in 'label', found \['pos'\]"),
    (ROWS[:8], {}, r"8 rows is too few"),
])
def test_malformed_task_file_names_what_is_wrong(tmp_path, rows, kwargs, message):
    with pytest.raises(TaskError, match=message):
        file_task(str(write(tmp_path, rows, ".csv")), **kwargs)


def test_task_file_with_an_unknown_suffix_lists_the_allowed_ones(tmp_path):
    path = tmp_path / "reviews.tsv"
    path.write_text("text\tlabel\n")
    with pytest.raises(TaskError, match=r"unknown format '\.tsv'; allowed: \.txt, \.csv, \.jsonl, \.json, \.parquet"):
        file_task(str(path))


def test_missing_task_file_says_it_does_not_exist(tmp_path):
    with pytest.raises(TaskError, match="reviews.csv does not exist"):
        file_task(str(tmp_path / "reviews.csv"))


def test_unreadable_task_file_says_which_format_it_was_read_as(tmp_path):
    path = tmp_path / "reviews.parquet"
    path.write_bytes(b"not a parquet file")
    with pytest.raises(TaskError, match="could not be read as parquet"):
        file_task(str(path))


# ---- encoding and batches ----

def encoded(tokenizer, is_encoder_decoder, max_length=256, **limits):
    rows = datasets.Dataset.from_dict({"input": [r["text"] for r in ROWS], "label": [i % 2 for i in range(30)]})
    task = Task("t", ["negative", "very positive"], datasets.DatasetDict({s: rows for s in ("train", "dev", "test")}))
    return encode_task(task, tokenizer, is_encoder_decoder, is_encoder_decoder, max_length, **limits)


def test_confirm_split_is_the_dev_examples_after_the_evaluated_ones(smollm2_tokenizer):
    whole = encoded(smollm2_tokenizer, False).splits["dev"]
    assert "confirm" not in encoded(smollm2_tokenizer, False).splits  # confirm=0: none
    splits = encoded(smollm2_tokenizer, False, max_eval=10, confirm=5).splits
    assert splits["dev"].input_ids == whole.input_ids[:10]
    assert splits["confirm"].input_ids == whole.input_ids[10:15] and splits["confirm"].labels == whole.labels[10:15]
    assert splits["test"].input_ids == whole.input_ids  # the test split is whole: max_eval does not cut it
    assert encoded(smollm2_tokenizer, False, max_eval=10, max_test=7).splits["test"].input_ids == whole.input_ids[:7]
    assert encoded(smollm2_tokenizer, False, max_eval=10, confirm=100).splits["confirm"].labels == whole.labels[10:]
    assert len(encoded(smollm2_tokenizer, False, max_eval=None, confirm=5).splits["confirm"]) == 0  # dev has them all


def test_encoding_targets_follow_a_space_for_causal_models_and_end_with_eos_for_t5(smollm2_tokenizer):
    tok = smollm2_tokenizer
    causal, seq2seq = encoded(tok, False), encoded(tok, True)
    assert causal.target_ids == [tok(" negative", add_special_tokens=False)["input_ids"],
                                 tok(" very positive", add_special_tokens=False)["input_ids"]]
    assert seq2seq.target_ids == [tok("negative", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                                  tok("very positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert causal.pad_id == tok.pad_token_id


def test_truncation_keeps_the_end_of_causal_inputs_and_the_start_of_t5_inputs(smollm2_tokenizer):
    full = encoded(smollm2_tokenizer, False).splits["train"].input_ids[0]
    assert len(full) > 4
    assert encoded(smollm2_tokenizer, False, max_length=4).splits["train"].input_ids[0] == full[-4:]
    assert encoded(smollm2_tokenizer, True, max_length=4).splits["train"].input_ids[0] == full[:4]


def toy_task(is_encoder_decoder):
    return EncodedTask("toy", ["a", "b c"], [[100], [200, 201]], {}, [], is_encoder_decoder, pad_id=2)


def test_causal_batch_is_left_padded_with_the_targets_at_the_right_edge():
    batch = make_batch(toy_task(False), [[10, 11, 12], [20]], [0, 1])
    assert batch.input_ids.tolist() == [[10, 11, 12, 100], [2, 20, 200, 201]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch.labels.tolist() == [[IGNORE, 100], [200, 201]]
    assert batch.classes.tolist() == [0, 1]
    targets = batch.labels != IGNORE
    assert torch.equal(batch.input_ids[:, -2:][targets], batch.labels[targets])


def test_t5_batch_is_right_padded_with_the_targets_as_labels():
    batch = make_batch(toy_task(True), [[10, 11, 12], [20]], [1, 0])
    assert batch.input_ids.tolist() == [[10, 11, 12], [20, 2, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[200, 201], [100, IGNORE]]


def lengths(n=1037, seed=0):
    return np.random.default_rng(seed).integers(5, 120, n).tolist()


def test_train_order_is_a_pure_function_of_seed_and_step():
    a, b = TrainOrder(lengths(), 8, seed=3), TrainOrder(lengths(), 8, seed=3)
    steps = [0, 1, 129, 130, 131, 400, 5]  # across epoch boundaries and back
    assert all(np.array_equal(a.indices(s), b.indices(s)) for s in steps)
    fresh = [TrainOrder(lengths(), 8, seed=3).indices(s) for s in steps]  # no state carried between calls
    assert all(np.array_equal(a.indices(s), f) for s, f in zip(steps, fresh))
    other = TrainOrder(lengths(), 8, seed=4)
    assert not all(np.array_equal(a.indices(s), other.indices(s)) for s in range(10))


def test_train_order_covers_each_example_exactly_once_per_epoch():
    n = 1037  # neither a multiple of the batch size nor of a bucket
    order = TrainOrder(lengths(n), 8, seed=0)
    per_epoch = order.batches_per_epoch()
    assert per_epoch == BUCKET_BATCHES * (n // (8 * BUCKET_BATCHES)) + -(-(n % (8 * BUCKET_BATCHES)) // 8)
    epochs = [np.concatenate([order.indices(e * per_epoch + s) for s in range(per_epoch)]) for e in range(2)]
    for seen in epochs:
        assert sorted(seen.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def padding(batches, lengths_):
    lengths_ = np.asarray(lengths_)
    return sum(int(lengths_[b].max() * len(b) - lengths_[b].sum()) for b in batches)


def test_train_order_batches_have_less_padding_than_random_batches():
    lengths_ = lengths(2000)
    order = TrainOrder(lengths_, 8, seed=0)
    ours = [order.indices(s) for s in range(order.batches_per_epoch())]
    shuffled = np.random.default_rng(0).permutation(2000)
    random_batches = [shuffled[i:i + 8] for i in range(0, 2000, 8)]
    assert padding(ours, lengths_) < padding(random_batches, lengths_) / 5


def test_train_batch_takes_the_gold_verbalizer_of_each_example():
    data = toy_task(False)
    data.splits["train"] = EncodedSplit([[10 + i] for i in range(6)], [0, 1, 1, 0, 1, 0])
    order = TrainOrder([1] * 6, 3, seed=0)
    for step in range(4):
        batch, idx = train_batch(data, order, step), order.indices(step)
        gold = [data.splits["train"].labels[i] for i in idx]
        assert batch.classes.tolist() == gold
        expected = [[2] * (c == 0) + [10 + i] + data.target_ids[c] for i, c in zip(idx, gold)]
        assert batch.input_ids.tolist() == [[2] * (3 - len(row)) + row for row in expected]
