"""Seeds (`seeds: N`): each point the sampler suggests runs as N Tune trials, seeds train.seed + 0..N-1,
in parallel where `concurrency` allows, each with its own checkpoints, ASHA rungs and MLflow run. The
sampler sees one trial per point, told the point's mean once all its seeds have ended."""
from __future__ import annotations

import copy
import statistics

from ray.tune.search import Searcher

from softprompt.search.record import RUNNING, SEED


class SeedRepeater(Searcher):
    """Hands out each point the inner searcher suggests `seeds` times, with `seed` added to its
    parameters, and tells the inner searcher (under the point's first trial id) the mean metric
    of the seeds that reported it. Following AshaAwareOptunaSearch, the point is stopped early
    (PRUNED) if any seed was or ended unstarted, and errored only if every seed errored.
    Tune snapshots this wrapper's state (get_state) with the inner searcher's (save_to_dir), so a
    resumed search neither runs a seed twice nor loses one."""

    def __init__(self, searcher: Searcher, seeds: int, first_seed: int):
        self.searcher, self.seeds, self.first_seed = searcher, seeds, first_seed
        self.points: dict[str, dict] = {}   # a point's first trial id -> its config, trial ids, ended seeds
        self.point_of: dict[str, str] = {}  # trial id -> its point's first trial id
        self.open: str | None = None        # the point still handing out seeds
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def suggest(self, trial_id: str) -> dict | None:
        if self.open is None:
            config = self.searcher.suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                return config
            self.open = trial_id
            self.points[trial_id] = {"config": config, "trials": [], "ended": {}, "told": False}
        point = self.points[self.open]
        point["trials"].append(trial_id)
        self.point_of[trial_id] = self.open
        if len(point["trials"]) == self.seeds:
            self.open = None
        return {**point["config"], SEED: self.first_seed + len(point["trials"]) - 1}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        first = self.point_of.get(trial_id)
        point = self.points.get(first)
        if point is None or point["told"]:  # not ours, or a seed retried after its point was told
            return
        point["ended"][trial_id] = (result, error)
        if len(point["ended"]) < self.seeds:
            return
        point["told"] = True
        outcomes = point["ended"].values()
        reported = [r for r, _ in outcomes if r and self.metric in r]
        if not reported:
            return self.searcher.on_trial_complete(first, None, error=all(e for _, e in outcomes))
        stopped = [r for r in reported if r.get("status") == RUNNING]
        unstarted = any(r is None and not e for r, e in outcomes)  # removed by Tune before it ran
        shown = min(stopped, key=lambda r: r["training_iteration"]) if stopped else reported[0]
        mean = statistics.fmean(r[self.metric] for r in reported)
        self.searcher.on_trial_complete(first, {**shown, self.metric: mean,
                                                "status": RUNNING if stopped or unstarted else shown.get("status")})

    def get_state(self) -> dict:
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "searcher"})

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)
