"""What a search prints while it runs: one line per trial event (started with its parameters, each
report with its metrics, stopped, completed, diverged, errored) and a one-line status every 30 s,
redrawn in place on a terminal. Ray's own tables show only with `--verbose`."""
from __future__ import annotations

import collections
import math
import sys
import time

from ray import tune

from softprompt.errors import one_line
from softprompt.search.record import RUNNING

STATUS_EVERY_S = 30.0


def shown_params(params: dict, lr_absolute: float | None = None) -> str:
    """The parameters; and the absolute lr the optimizer got, where the lr was in another unit."""
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    lrs = [v for k, v in params.items() if k.split("@")[0] == "lr"]
    if lr_absolute is not None and lrs and not math.isclose(lrs[0], lr_absolute):
        shown += f" (absolute lr {lr_absolute:.3g})"
    return shown


def _value(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class TrialLines(tune.Callback):
    """Tune callback printing the search's trial events for a person to follow."""

    def __init__(self, metric: str, mode: str, every_s: float = STATUS_EVERY_S):
        self.metric, self.mode, self.every_s = metric, mode, every_s
        self._reset()

    def _reset(self) -> None:
        self.started = self.shown = time.monotonic()
        self.best: tuple[float, str] | None = None
        self.status_drawn = False  # a terminal's status line is on screen, unterminated

    def setup(self, **info):
        self._reset()  # a resumed search's callback comes back from Tune's pickle

    def _print(self, line: str) -> None:
        if self.status_drawn:
            sys.stdout.write("\r\033[K")
            self.status_drawn = False
        print(f"[{self._clock()}] {line}", flush=True)

    def _clock(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"

    def on_trial_start(self, iteration, trials, trial, **info):
        self._print(f"trial {trial.trial_id} started: {shown_params(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        status = result.get("status")
        if status in ("diverged", "out_of_memory"):
            self._print(f"trial {trial.trial_id} {status.replace('_', ' ')}: {result.get('error', '')}")
            return
        scored = result.get("best_step", 0) > 0  # else best_dev_* are placeholders (score_after_report)
        parts = [f"{k} {_value(result[k])}" for k in ("train_loss",) if k in result]
        parts += [f"{k} {_value(v)}" for k, v in result.items() if k.startswith("dev_") and k != "dev_examples"]
        if scored and self.metric in result:
            parts.append(f"{self.metric} {_value(result[self.metric])} @ {result['best_step']}")
            self._note_best(result[self.metric], trial.trial_id)
        if (confirmed := "confirmed_" + self.metric.removeprefix("best_dev_")) in result:
            parts.append(f"confirmed {_value(result[confirmed])}")
        self._print(f"trial {trial.trial_id} step {result.get('step', '?')}: " + ", ".join(parts))

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get("status") == RUNNING:  # the scheduler ended it before max_steps
            self._print(f"trial {trial.trial_id} stopped early at step {result.get('step', '?')}")
        elif result.get("status") == "completed":
            self._print(f"trial {trial.trial_id} completed")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._print(f"trial {trial.trial_id} failed; Ray retries it")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial.get_error()
        last = str(error).strip().splitlines()[-1] if error else "see its error.txt"
        self._print(f"trial {trial.trial_id} errored: {one_line(last)}")

    def _note_best(self, value: float, trial_id: str) -> None:
        better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
        if better and math.isfinite(value):
            self.best = (value, trial_id)

    def status_line(self, trials) -> str:
        counts = collections.Counter(trial.status for trial in trials)
        shown = ", ".join(f"{n} {status.lower()}" for status, n in sorted(counts.items()))
        best = f"; best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else ""
        return f"{shown}{best}"

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.shown < self.every_s:
            return
        self.shown = time.monotonic()
        if sys.stdout.isatty():
            sys.stdout.write(f"\r\033[K[{self._clock()}] {self.status_line(trials)}")
            sys.stdout.flush()
            self.status_drawn = True
        else:
            print(f"[{self._clock()}] {self.status_line(trials)}", flush=True)

    def on_experiment_end(self, trials, **info):
        self._print(self.status_line(trials))
