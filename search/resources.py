"""Can a search's trials ever start on this Ray cluster? Checked once Ray is up, before the first trial:
Ray waits for resources it lacks and never gives up. A trial's resources are one placement-group bundle, so
they must fit on one node. Where none fits and none can be added, the search is refused; where an autoscaler
may add one, the search waits and says once what for.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
import ray._private.state
import yaml
from ray._private import ray_constants
from ray.autoscaler._private.util import format_readonly_node_type
from ray.experimental.internal_kv import _internal_kv_get

from softprompt.configfile import ConfigError

FIELDS = {"GPU": "gpus_per_trial", "CPU": "cpus_per_trial"}  # GPUs first: the likelier mistake
LAUNCHER_CONFIG = Path("~/ray_bootstrap_config.yaml")  # on the head of a `ray up` cluster


def shortfall(asked: dict[str, float], nodes: list[dict]) -> tuple[str, float] | None:
    """None if one of `nodes` (resource dicts) holds all of `asked`; else the first resource, GPU
    before CPU, that no node holding the ones before it has enough of, and the most such a node has."""
    candidates = nodes
    for resource in FIELDS:
        fitting = [n for n in candidates if n.get(resource, 0) >= asked[resource]]
        if not fitting:
            return resource, max((n.get(resource, 0) for n in candidates), default=0)
        candidates = fitting
    return None


def check_trial_resources(cpus_per_trial: float, gpus_per_trial: float, nodes: list[dict],
                          addable: list[dict], cluster: str) -> str | None:
    """None if a node of the cluster holds a trial now; the line to say once if only a node an
    autoscaler may add would (`addable`: those node types' resources, {} where unknown). A trial
    nothing can ever hold is a ConfigError naming the field, the value and what the cluster has."""
    asked = {"CPU": cpus_per_trial, "GPU": gpus_per_trial}
    if shortfall(asked, nodes) is None:
        return None
    missing = shortfall(asked, nodes + addable) if {} not in addable else None
    if missing is None:
        return (f"softprompt: no node of {cluster} can hold a trial now ({cpus_per_trial:g} CPU, "
                f"{gpus_per_trial:g} GPU): the search waits for the autoscaler to add one")
    resource, most = missing
    beside = f" with {gpus_per_trial:g} GPU" if resource == "CPU" and gpus_per_trial else ""
    where = " or of the node types its autoscaler may add" if addable else ""
    grows = "" if addable else ", and it cannot add nodes"
    raise ConfigError(FIELDS[resource], asked[resource], f"at most {most:g}, the most {resource}s one node{beside} "
                                                         f"of {cluster}{where} has{grows} (a trial runs on one node)")


def addable_node_types(started_here: bool) -> list[dict]:
    """The resources of each node type an autoscaler may add to the connected cluster ({} where it
    does not say); [] when nothing can add a node. Ray 2.60 has no public API for this: the private
    ones below are what Ray's own libraries read (Train and Data the GCS config, Tune the launcher file)."""
    if started_here:  # `ray.init()` by this process: one node, and nothing adds another
        return []
    config = ray._private.state.state.get_cluster_config()
    if config is not None:  # autoscaler v2, where its provider publishes its node groups
        return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
    launcher = LAUNCHER_CONFIG.expanduser()
    if launcher.is_file():  # what Tune checks itself (ray/tune/execution/cluster_info.py)
        types = yaml.safe_load(launcher.read_text()).get("available_node_types", {})
        return [t.get("resources") or {} for t in types.values() if t.get("max_workers", 0) > 0]
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") if status else None
    if mapping and all(kind == format_readonly_node_type(node) for node, kind in mapping.items()):
        return []  # `ray start` by hand: the monitor only mirrors the nodes it sees, one type each
    return [{}]  # an autoscaler that does not say what it may add


def check_cluster(cpus_per_trial: float, gpus_per_trial: float, started_here: bool) -> None:
    """Refuse a search whose trials this Ray cluster can never hold; on an autoscaling one, say once
    what the search waits for (stderr)."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    cluster = "this local Ray" if started_here else "this Ray cluster"
    waiting = check_trial_resources(cpus_per_trial, gpus_per_trial, nodes, addable_node_types(started_here), cluster)
    if waiting:
        print(waiting, file=sys.stderr, flush=True)
