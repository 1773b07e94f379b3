"""`softprompt serve`'s settings: a serve config's fields, their defaults and one-line refusals
(cli/serve.py starts the application; serving/ray_serve.py is what runs in a replica)."""
from __future__ import annotations

from softprompt.configfile import Rule, check_fields, integer, load_yaml, number, parse_overrides

ACTIONS = ("status", "stop")
DEFAULTS = {
    "name": "softprompt",          # the Serve application
    "route_prefix": "/",
    "host": "127.0.0.1",           # where Serve's HTTP proxy listens (0.0.0.0 only behind a firewall)
    "port": 8000,
    "replicas": 1,                 # fixed replicas; or autoscaling
    "autoscaling": None,           # {min_replicas, max_replicas, target_ongoing_requests}
    "num_cpus": 1,                 # per replica
    "num_gpus": 0,                 # per replica: a fraction shares a GPU between replicas
    "max_batch_size": 32,          # requests Serve collects into one batch
    "batch_wait_timeout_s": 0.0,   # how long an idle replica's first batch waits to fill (passes under load
                                   # take every request that arrived during the last one, whatever this is)
    "max_pass_tokens": 8192,       # a batch's rows run in passes of at most this many tokens
    "max_ongoing_requests": 64,    # per replica, before Serve queues at the proxy
    "max_request_bytes": 1_000_000,  # a larger body gets a 413
    "body_timeout_s": 10.0,        # a body not read by then gets a 503 (a request Serve retried after a replica died)
    "refresh_s": 2.0,              # how often a replica asks the registry where its alias points
}
AUTOSCALING_KEYS = {"min_replicas", "max_replicas", "target_ongoing_requests"}


def _autoscaling(v) -> bool:
    if v is None:
        return True
    if not isinstance(v, dict) or not set(v) <= AUTOSCALING_KEYS:
        return False
    low, high = v.get("min_replicas", 1), v.get("max_replicas", 1)
    return all(isinstance(n, int) and not isinstance(n, bool) for n in (low, high)) and 0 <= low <= high and high >= 1


RULES: dict[str, Rule] = {
    "name": Rule(lambda v: isinstance(v, str) and v.replace("-", "").replace("_", "").isalnum(),
                 "letters, digits, '-' and '_'"),
    "route_prefix": Rule(lambda v: isinstance(v, str) and v.startswith("/"), "a path starting with /"),
    "host": Rule(lambda v: isinstance(v, str) and v != "", "a host name or address"),
    "port": integer(1, 65535),
    "replicas": integer(1),
    "autoscaling": Rule(_autoscaling, "null or a mapping of min_replicas <= max_replicas (integers, max >= 1) and "
                                      "target_ongoing_requests"),
    "num_cpus": number(0),
    "num_gpus": number(0),
    "max_batch_size": integer(1),
    "batch_wait_timeout_s": number(0),
    "max_pass_tokens": integer(16),
    "max_ongoing_requests": integer(1),
    "max_request_bytes": integer(1024),
    "body_timeout_s": number(0.1),
    "refresh_s": number(0.1),
}


def serve_settings(path: str | None, overrides: list[str] = ()) -> dict:
    """DEFAULTS, then the config file's fields, then `--set` pairs; each checked (ConfigError)."""
    values = load_yaml(path) if path else {}
    values.update(parse_overrides(list(overrides)))
    check_fields(values, RULES, path)
    return {**DEFAULTS, **values}
