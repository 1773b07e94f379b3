"""A search as its files say it is, read once: its saved config, one row per trial, their ranking
and the summary `search run|resume` wrote. The CLI, tracking and export all read a search this way."""
from __future__ import annotations

import collections
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial

from softprompt.search.config import SELECT_BY_METRIC, ConfigError, SearchConfig
from softprompt.search.storage import CONFIG_FILE, SUMMARY_FILE, SearchStorage
from softprompt.trainables.config import TrainConfig

# A trial's status: Ray's state, or for a trial Ray ended, the status it reported last.
ERRORED, UNFINISHED, STOPPED_EARLY, COMPLETED = "errored", "unfinished", "stopped early", "completed"
RUNNING = "running"  # what a trial reports before its final result: one that ended on it was stopped early
# The search metric's counterpart on the confirm split (trainables.loop.final_metrics); none for train_loss.
CONFIRMED = {metric: f"confirmed_dev_{dev}" for metric, dev in SELECT_BY_METRIC.items()}
SEED = "seed"  # the parameter a search with `seeds` > 1 adds to each trial (search/seeds.py)
# Where a trial's time went, as its reports count it (trainables.loop.train, trainables.trainable.tune_trial).
TRIAL_SECONDS = {"setup_s": "start-up", "train_s": "training", "rung_eval_s": "dev scoring at rungs",
                 "confirm_s": "confirmation"}


def save_config(cfg: SearchConfig) -> None:
    """A new search's config, saved in its folder (for a URI, uploaded too)."""
    SearchStorage(cfg.storage_path, cfg.name).write_text(CONFIG_FILE,
                                                         yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def read_config(search: SearchStorage) -> SearchConfig:
    """The search's saved config; for a URI, with the search's own files brought to this machine first."""
    path = search.pull() / CONFIG_FILE
    if not path.is_file():
        raise ConfigError("search name", search.name, f"a search under {search.location.rsplit('/', 1)[0]} "
                                                      f"(no {CONFIG_FILE} there)")
    values = yaml.safe_load(path.read_text())
    train = values["train"]
    eval_steps = tuple(train["eval_steps"]) if train.get("eval_steps") else None
    values["train"] = TrainConfig(**{**train, "eval_steps": eval_steps})
    values["checkpoints"] = tuple(values["checkpoints"])
    values.setdefault("asha_metric", values["metric"])  # saved before ASHA's metric could differ
    if values["points_to_evaluate"] is not None:
        values["points_to_evaluate"] = tuple(values["points_to_evaluate"])
    return SearchConfig(**values)


def trial_status(trial: Trial) -> str:
    if trial.status == Trial.ERROR:
        return ERRORED
    if trial.status != Trial.TERMINATED:
        return UNFINISHED
    reported = (trial.last_result or {}).get("status", "?")
    return STOPPED_EARLY if reported == RUNNING else reported


def rank_rows(rows: list[dict], mode: str) -> list[dict]:
    """Trial (or point) rows best first: confirmed ones by `confirmed`, then the rest by `metric` (`mode`
    max or min); on a tie, a completed one first."""
    sign = 1 if mode == "max" else -1
    return sorted(rows, reverse=True, key=lambda r: (r["confirmed"] is not None, r["confirmed"] or 0.0,
                                                     sign * r["metric"], r["status"] == COMPLETED))


def sample_sd(values: list[float]) -> float | None:
    """The sample standard deviation (n - 1), or None for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else None


def point_row(rows: list[dict], mode: str) -> dict:
    """One point's evaluated trials (its seeds) as a row `rank_rows` ranks: the mean, sd and n of the
    metric, and of `confirmed` if every seed was confirmed (else a seed ASHA stopped would rank it
    by its luckier siblings alone); completed if every seed was."""
    metrics, confirmed = [r["metric"] for r in rows], [r["confirmed"] for r in rows]
    every = all(c is not None for c in confirmed)
    return {"trials": rank_rows(rows, mode), "n": len(rows), "metric": statistics.fmean(metrics),
            "sd": sample_sd(metrics), "confirmed": statistics.fmean(confirmed) if every else None,
            "confirmed_sd": sample_sd(confirmed) if every else None,
            "status": next((r["status"] for r in rows if r["status"] != COMPLETED), COMPLETED)}


@dataclass(frozen=True)
class SearchRecord:
    """A finished search, or a running one as far as it has got when loaded."""
    storage: SearchStorage  # where it lives: its name, its folder on this machine
    config: SearchConfig
    # One row per trial: id, status, parameters, last step and metrics (`confirmed`: the search metric
    # on the confirm split, for trials that ran to the end), and `prompt`: the best prompt's folder
    # (for a search on a URI, its URI: `SearchStorage.local_copy` brings it here).
    trials: list[dict]
    summary: dict | None  # the winner against zero-shot that `search run|resume` saved, if any

    @classmethod
    def load(cls, storage_path: str, name: str) -> SearchRecord:
        """Search `name` under `storage_path`: its config, Tune's record of its trials and its summary."""
        search = SearchStorage(storage_path, name)
        cfg = read_config(search)
        analysis = ExperimentAnalysis(search.tune_path(), storage_filesystem=search.tune_storage()[1])
        rows = []
        for trial in analysis.trials:
            last = trial.last_result or {}
            checkpoint = trial.checkpoint.path if trial.checkpoint else None
            scored = last.get("best_step") != 0  # 0: stopped before any dev scoring (trainables.loop.best_metrics)
            rows.append({"trial_id": trial.trial_id, "status": trial_status(trial),
                         "params": trial.config, "step": last.get("step"),
                         "metric": last.get(cfg.metric) if scored else None,
                         "confirmed": last.get(CONFIRMED.get(cfg.metric, "")),
                         "test_accuracy": last.get("test_accuracy"),
                         "prompt": search.remote_location(f"{checkpoint}/best") if checkpoint else None,
                         "lr_absolute": last.get("lr_absolute"),
                         "reported_at": last.get("timestamp"),  # Tune's, in whole seconds since the epoch
                         "seconds": {key: last.get(key, 0.0) for key in TRIAL_SECONDS}})
        path = search.folder / SUMMARY_FILE
        summary = json.loads(path.read_text()) if path.is_file() else {}
        return cls(search, cfg, rows, summary if "beats_zero_shot" in summary else None)

    @property
    def summary_path(self) -> Path:
        return self.storage.folder / SUMMARY_FILE

    def statuses(self) -> dict[str, int]:
        """How many trials have each status."""
        return dict(collections.Counter(r["status"] for r in self.trials))

    def evaluated(self) -> list[dict]:
        """The trials with a metric and a prompt."""
        return [r for r in self.trials if r["metric"] is not None and r["prompt"]]

    def points(self) -> list[dict]:
        """The evaluated trials grouped into points (`point_row`: the same parameters but the seed), best
        first: confirmed ones by that score (docs/configuration.md says why), then by the metric. None: an error."""
        rows = self.evaluated()
        if not rows:
            raise ConfigError("search", self.storage.name, "a search with at least one evaluated trial")
        groups: dict[str, list[list[dict]]] = {}
        for row in rows:  # a sampler may suggest the same parameters twice: two points, each with its seeds once
            key = row["trial_id"] if self.config.seeds == 1 else json.dumps(
                {k: v for k, v in row["params"].items() if k != SEED}, sort_keys=True, default=str)
            alike = groups.setdefault(key, [])
            group = next((g for g in alike if all(r["params"].get(SEED) != row["params"].get(SEED) for r in g)), None)
            if group is None:
                alike.append([row])
            else:
                group.append(row)
        ranked = rank_rows([point_row(group, self.config.mode) for alike in groups.values() for group in alike],
                           self.config.mode)
        # a point some of whose seeds never evaluated ranks after the whole ones: its mean is of its luckier seeds
        return sorted(ranked, key=lambda point: point["n"] < self.config.seeds)

    def ranked(self) -> list[dict]:
        """The evaluated trials, best first: by point (`points`), and within a point its seeds best first."""
        return [trial for point in self.points() for trial in point["trials"]]

    def best(self) -> dict:
        """The winner: the best point's best seed, its `prompt` a folder on this machine; with seeds,
        `point` holds the point's mean, sd and n (of the metric and of `confirmed`) and its trials."""
        point = self.points()[0]
        best = point["trials"][0]
        seeds = {"point": {"mean": point["metric"], "sd": point["sd"], "n": point["n"],
                           "confirmed_mean": point["confirmed"], "confirmed_sd": point["confirmed_sd"],
                           "trials": [r["trial_id"] for r in point["trials"]]}} if self.config.seeds > 1 else {}
        return {**best, "prompt": str(self.storage.local_copy(best["prompt"])), **seeds}

    def time_spent(self, wall_s: float, driver_s: float, since: float | None = None) -> dict[str, float]:
        """Seconds of the search's slots (`concurrency` x `wall_s`) by what filled them: the trials' own
        counts, the driver's final scoring (`driver_s`, the whole machine's), and the rest (Ray's start,
        scheduling, slots left idle). `since` (a resume's start, seconds since the epoch): only the trials
        that reported after it, whose counts are of this run (a trial counts from its process's start)."""
        ran = [r for r in self.trials if since is None or (r.get("reported_at") or 0) >= int(since)]
        spent = {label: sum(r["seconds"][key] for r in ran) for key, label in TRIAL_SECONDS.items()}
        spent["final test scoring"] = driver_s * self.config.concurrency
        spent["Ray, scheduling and idle slots"] = max(0.0, wall_s * self.config.concurrency - sum(spent.values()))
        return spent

    def summary_of(self, trial_id: str) -> dict | None:
        """The saved summary, if it was written for this winner (a resumed search may have another)."""
        return self.summary if self.summary and self.summary["best_trial"] == trial_id else None

    def save_summary(self, summary: dict) -> None:
        self.storage.write_text(SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
