"""What a search prints while it runs (search/console.py): a line per trial event, a status line
every 30 s, and nothing of Ray's tables unless asked."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from softprompt.search.console import TrialLines, shown_params

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)


@dataclass
class FakeTrial:  # the fields of ray.tune.experiment.Trial a callback reads
    trial_id: str
    config: dict
    status: str = "RUNNING"
    last_result: dict = field(default_factory=dict)
    error: str | None = None

    def get_error(self):
        return RuntimeError(self.error) if self.error else None


@pytest.fixture
def lines(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    callback = TrialLines("best_dev_accuracy", "max", every_s=0.0)
    callback.setup()

    def printed() -> list[str]:
        return [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    return callback, printed


def test_each_trial_event_is_one_line_naming_the_trial(lines):
    callback, printed = lines
    a = FakeTrial("a_00000", {"lr": 0.0123456, "optimizer": "adamw"})
    b = FakeTrial("a_00001", {"lr": 0.3, "optimizer": "adafactor"})
    callback.on_trial_start(0, [a, b], a)
    # a rung report whose dev scoring waits (best_step 0: best_dev_* are placeholders), then a scored one
    callback.on_trial_result(0, [a, b], a, {"step": 15, "train_loss": 0.69, "best_dev_accuracy": 0.0, "best_step": 0})
    callback.on_trial_result(0, [a, b], a, {"step": 45, "train_loss": 0.5, "dev_accuracy": 0.7,
                                            "best_dev_accuracy": 0.72, "best_step": 15})
    a.last_result = {"step": 45, "status": "running"}
    callback.on_trial_complete(0, [a, b], a)
    callback.on_trial_result(0, [a, b], b, {"step": 3, "status": "diverged", "error": "loss became nan at step 3"})
    b.last_result = {"step": 135, "status": "diverged"}
    callback.on_trial_complete(0, [a, b], b)  # already said: no second line
    c = FakeTrial("a_00002", {"lr": 0.1}, status="ERROR", error="Traceback ...\nValueError: bad batch")
    callback.on_trial_error(0, [a, b, c], c)
    assert printed() == [
        "trial a_00000 started: lr=0.0123, optimizer=adamw",
        "trial a_00000 step 15: train_loss 0.6900",
        "trial a_00000 step 45: train_loss 0.5000, dev_accuracy 0.7000, best_dev_accuracy 0.7200 @ 15",
        "trial a_00000 stopped early at step 45",
        "trial a_00001 diverged: loss became nan at step 3",
        "trial a_00002 errored: ValueError: bad batch",
    ]


def test_a_completed_trial_says_so_with_its_confirmation(lines):
    callback, printed = lines
    t = FakeTrial("b_00000", {"lr": 0.1})
    callback.on_trial_result(0, [t], t, {"step": 135, "train_loss": 0.4, "best_dev_accuracy": 0.8, "best_step": 90,
                                         "confirmed_accuracy": 0.775, "status": "completed"})
    t.last_result = {"step": 135, "status": "completed"}
    callback.on_trial_complete(0, [t], t)
    assert printed() == ["trial b_00000 step 135: train_loss 0.4000, best_dev_accuracy 0.8000 @ 90, confirmed 0.7750",
                         "trial b_00000 completed"]


@pytest.mark.parametrize("mode, best", [("max", "0.9000 (trial x1)"), ("min", "0.5000 (trial x0)")])
def test_the_status_line_counts_trials_by_state_and_names_the_best_so_far(lines, mode, best):
    callback, printed = lines
    callback.mode = mode
    trials = [FakeTrial("x0", {}, "TERMINATED"), FakeTrial("x1", {}, "RUNNING"), FakeTrial("x2", {}, "PENDING"),
              FakeTrial("x3", {}, "RUNNING")]
    for trial, value in ((trials[0], 0.5), (trials[1], 0.9), (trials[3], float("nan"))):
        callback.on_trial_result(0, trials, trial, {"step": 15, "best_dev_accuracy": value, "best_step": 15})
    printed()
    callback.on_step_end(0, trials)
    assert printed() == [f"1 pending, 2 running, 1 terminated; best best_dev_accuracy {best}"]


def test_the_status_line_waits_its_interval(lines):
    callback, printed = lines
    callback.every_s = 3600.0
    callback.on_step_end(0, [FakeTrial("x0", {})])
    assert printed() == []


def test_parameters_show_three_significant_digits_and_the_absolute_lr_where_it_differs():
    assert shown_params({"lr": 0.30000001, "prompt_length": 20}) == "lr=0.3, prompt_length=20"
    assert shown_params({"lr": 0.5}, lr_absolute=0.058) == "lr=0.5 (absolute lr 0.058)"
    assert shown_params({"lr": 0.5}, lr_absolute=0.5) == "lr=0.5"
