"""A worker's tokenised task is cached by one spec of its inputs (DataSpec), the same one
prepare_data reads them from: a change to any input is a new key, so a trial is never served
another configuration's data; and its backbones by functools.lru_cache, at most two."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from softprompt.models import backbone as backbones
from softprompt.trainables import loop, trainable
from softprompt.trainables.config import TrainConfig
from softprompt.trainables.loop import DataSpec

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

# another value for every field of DataSpec: a field added there and not here fails the first test
CHANGED = {"task": {"dataset": "reviews.csv", "template": "{text}"}, "text_column": "review", "label_column": "stars",
           "verbalizers": {"0": "bad", "1": "good"}, "max_length": 64, "max_train_examples": 10,
           "max_eval_examples": 20, "confirm_examples": 5, "max_test_examples": 30, "sentinel": True}


def test_a_change_to_any_input_of_the_data_is_a_new_key():
    assert set(CHANGED) == {field.name for field in dataclasses.fields(DataSpec)}
    base = DataSpec.of(TrainConfig())
    for name, value in CHANGED.items():
        changed = DataSpec.of(TrainConfig(**{name: value}))
        assert changed != base and hash(changed) != hash(base), name


def test_equal_inputs_are_one_key_whatever_the_order_of_a_mappings_keys():
    a = DataSpec.of(TrainConfig(task={"dataset": "d", "template": "{text}"}, verbalizers={"0": "no", "1": "yes"}))
    b = DataSpec.of(TrainConfig(task={"template": "{text}", "dataset": "d"}, verbalizers={"1": "yes", "0": "no"}))
    assert a == b and hash(a) == hash(b)


class Config:
    """A TrainConfig that records which fields are read."""

    def __init__(self):
        self.read = set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(TrainConfig(), name)


def test_prepare_data_reads_no_field_of_the_config_that_the_key_lacks(monkeypatch):
    monkeypatch.setattr(loop, "load_task", lambda *args: SimpleNamespace())
    monkeypatch.setattr(loop, "encode_task", lambda *args: "encoded")
    cfg = Config()
    loop.prepare_data(cfg, SimpleNamespace(tokenizer=None, is_encoder_decoder=False, vocab_is_frequency_ordered=False))
    assert cfg.read <= set(CHANGED)


def test_a_worker_tokenises_again_only_when_an_input_or_the_backbone_changes(monkeypatch):
    made = []
    monkeypatch.setattr(trainable, "prepare_data", lambda cfg, backbone: made.append(cfg) or len(made))
    monkeypatch.setattr(trainable, "_WORKER_DATA", {})
    cfg, backbone = TrainConfig(), SimpleNamespace(fingerprint="f")
    assert trainable._cached_data(cfg, backbone) == trainable._cached_data(cfg.replace(lr=0.1, seed=3), backbone) == 1
    assert trainable._cached_data(cfg.replace(max_length=64), backbone) == 2
    assert trainable._cached_data(cfg.replace(max_length=64), SimpleNamespace(fingerprint="g")) == 3


@pytest.fixture
def loads(monkeypatch):
    """load_backbone replaced by a recorder; the worker's cache emptied before and after."""
    loaded = []
    monkeypatch.setattr(backbones, "load_backbone", lambda *key: loaded.append(key) or object())
    backbones._worker_backbone.cache_clear()
    yield loaded
    backbones._worker_backbone.cache_clear()


def test_a_worker_keeps_its_two_most_recently_used_backbones(loads):
    cpu = backbones.torch.device("cpu")
    first, reused = backbones.cached_backbone("a", "auto", cpu)
    assert not reused and backbones.cached_backbone("a", "auto", cpu) == (first, True)
    backbones.cached_backbone("b", "auto", cpu)
    backbones.cached_backbone("a", "auto", cpu)
    backbones.cached_backbone("c", "auto", cpu)  # b is the least recently used: it goes
    assert backbones.cached_backbone("a", "auto", cpu)[1] and not backbones.cached_backbone("b", "auto", cpu)[1]
    assert not backbones.cached_backbone("a", "float32", cpu)[1]  # another dtype is another backbone
    assert [key[:2] for key in loads] == [("a", "auto"), ("b", "auto"), ("c", "auto"), ("b", "auto"), ("a", "float32")]
