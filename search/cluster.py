"""`softprompt cluster check FILE`: a cluster-launcher file checked offline, before `ray up`, for what
Ray's schema lets through but makes a search useless or unsafe (docs/cluster.md lists the checks); every
problem is one ConfigError naming the key path, the value and what is allowed.
"""
from __future__ import annotations

import difflib
import json
import logging
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from softprompt.configfile import ConfigError
from softprompt.errors import one_line

# Ports a search's cluster serves that must never face the internet: each runs code or shows data.
SERVICE_PORTS = {8265: "Ray dashboard and job API", 6379: "Ray GCS", 10001: "Ray client", 5000: "MLflow"}
OPEN_TO_ALL = {"0.0.0.0/0", "::/0"}
# EC2 families with NVIDIA GPUs (g4ad/Inferentia/Trainium are not CUDA devices).
AWS_GPU_FAMILIES = ("p2", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6", "g3", "g3s", "g4dn", "g5", "g5g",
                    "g6", "g6e", "gr6", "g7e")
GCP_GPU_MACHINES = ("a2-", "a3-", "a4-", "g2-")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class CheckResult:
    """What `cluster check` found: the problems, and a summary to print when there are none."""
    problems: list[ConfigError] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)


def _ray_config(raw: dict, source: str) -> tuple[dict | None, list[ConfigError]]:
    """Ray's own preparation and schema check, as `ray up` would run them (no cloud calls)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    schema_keys = _schema_keys()
    typos = [ConfigError(key, raw[key], _known_key(key, schema_keys), source) for key in raw if key not in schema_keys]
    if typos:
        return None, typos
    try:
        config = prepare_config(raw)
        validate_config(config)
    except jsonschema.ValidationError as error:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        return None, [ConfigError(where, error.instance, f"Ray's cluster schema: {error.message}", source)]
    except (Exception, SystemExit) as error:  # Ray's own checks abort with a message
        return None, [ConfigError("(file)", Path(source).name, f"a file `ray up` accepts: {error}", source)]
    return config, []


def _schema_keys() -> list[str]:
    import ray.autoscaler
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return list(schema["properties"])


def _known_key(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + "a key of Ray's cluster schema"


def _gpu_instance(provider: str, node_config: dict) -> str | None:
    """The node's machine type if it carries GPUs, else None."""
    if provider == "aws":
        kind = str(node_config.get("InstanceType", ""))
        return kind if kind.split(".")[0] in AWS_GPU_FAMILIES else None
    if provider == "gcp":
        kind = str(node_config.get("machineType", ""))
        return kind if kind.startswith(GCP_GPU_MACHINES) or node_config.get("guestAccelerators") else None
    if provider == "azure":
        kind = str(node_config.get("azure_arm_parameters", {}).get("vmSize", ""))
        return kind if kind.startswith("Standard_N") else None
    return None


def _check_gpus(config: dict, source: str) -> list[ConfigError]:
    """A GPU node type must declare its GPUs: the autoscaler launches a type only for resources it
    declares, and fractional trials (gpus_per_trial: 0.25) pack only onto a known count."""
    provider = config["provider"]["type"]
    problems = []
    for name, node_type in config["available_node_types"].items():
        gpus = node_type.get("resources", {}).get("GPU")
        instance = _gpu_instance(provider, node_type.get("node_config", {}))
        where = f"available_node_types.{name}.resources.GPU"
        if instance and not gpus:
            problems.append(ConfigError(where, gpus,
                                        f"the GPU count of {instance} (e.g. resources: {{GPU: 1}}), so the autoscaler "
                                        "starts it for GPU trials and fractional trials pack", source))
        elif gpus and provider in ("aws", "gcp", "azure") and not instance:
            node_config = node_type.get("node_config", {})
            kind = node_config.get("InstanceType") or node_config.get("machineType")
            problems.append(ConfigError(where, gpus, f"0 or unset: {kind} has no GPU, trials sent to it would wait "
                                                     "forever", source))
    return problems


def _rule_ports(rule: dict) -> range:
    if str(rule.get("IpProtocol")) == "-1":
        return range(0, 65536)
    return range(int(rule.get("FromPort", 0)), int(rule.get("ToPort", rule.get("FromPort", 0))) + 1)


def _check_firewall(config: dict, service_ports: dict[int, str], source: str) -> list[ConfigError]:
    """No security-group rule opens a service port to the whole internet (SSH alone is fine)."""
    rules = config["provider"].get("security_group", {}).get("IpPermissions", []) or []
    problems = []
    for i, rule in enumerate(rules):
        cidrs = ({r.get("CidrIp") for r in rule.get("IpRanges", [])}
                 | {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])})
        if not cidrs & OPEN_TO_ALL:
            continue
        exposed = [f"{port} ({what})" for port, what in service_ports.items() if port in _rule_ports(rule)]
        if exposed:
            problems.append(ConfigError(
                f"provider.security_group.IpPermissions[{i}]", rule,
                f"no rule opening {', '.join(exposed)} to {sorted(cidrs & OPEN_TO_ALL)[0]}: reach the dashboard with "
                f"`ray dashboard {Path(source).name}` and MLflow through an SSH tunnel", source))
    return problems


def _option(words: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in a command's words."""
    for i, word in enumerate(words):
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(words):
            return words[i + 1]
    return None


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command.replace(";", " ; ").replace("&&", " && "))
    except ValueError:
        return command.split()


def _mlflow_server(config: dict) -> tuple[int, str] | None:
    """(index, command) of the head command that starts the MLflow tracking server."""
    return next(((i, command) for i, command in enumerate(config.get("head_start_ray_commands", []))
                 if re.search(r"\bmlflow\s+server\b", command)), None)


def _check_head_commands(config: dict, source: str) -> list[ConfigError]:
    """Ray started with token auth and without usage stats, its dashboard on localhost; an MLflow
    server with a database backend on the head, not listening where the internet can reach it."""
    problems = []
    local = config["provider"]["type"] == "local"
    head_ip = config["provider"].get("head_ip")
    starts = [(key, i, c) for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for i, c in enumerate(config.get(key, [])) if re.search(r"\bray\s+start\b", c)]
    for key, i, command in starts:
        words = _words(command)
        if "RAY_AUTH_MODE=token" not in command:
            problems.append(ConfigError(f"{key}[{i}]", command,
                                        "RAY_AUTH_MODE=token in the same command as `ray start` "
                                        "(each command runs in its own shell)", source))
        if key == "head_start_ray_commands" and "--disable-usage-stats" not in words:
            problems.append(ConfigError(f"{key}[{i}]", command, "`ray start --head ... --disable-usage-stats`", source))
        host = _option(words, "--dashboard-host")
        if host and host not in LOOPBACK:
            problems.append(ConfigError(f"{key}[{i}] --dashboard-host", host, "127.0.0.1 (Ray's default): the job API "
                                        f"runs code; reach it with `ray dashboard {Path(source).name}`", source))
    if not any(key == "head_start_ray_commands" for key, _, _ in starts):
        problems.append(ConfigError("head_start_ray_commands", config.get("head_start_ray_commands"),
                                    "a `RAY_AUTH_MODE=token ray start --head ...` command", source))
    found = _mlflow_server(config)
    if found is None:
        problems.append(ConfigError("head_start_ray_commands", config.get("head_start_ray_commands"),
                                    "a command starting the tracking server on the head: mlflow server "
                                    "--backend-store-uri sqlite:///... --host ... --port 5000", source))
        return problems
    i, command = found
    words = _words(command)
    where = f"head_start_ray_commands[{i}]"
    store = _option(words, "--backend-store-uri")
    if not store or not re.match(r"(sqlite|postgresql|mysql|mssql)", store):
        problems.append(ConfigError(f"{where} --backend-store-uri", store, "a database: sqlite:///PATH, "
                                    "postgresql://... or mysql://... (MLflow's file store is deprecated)", source))
    host = _option(words, "--host") or "127.0.0.1"
    allowed_hosts = LOOPBACK | {head_ip} if local else LOOPBACK | {"0.0.0.0"}
    if host not in allowed_hosts and not host.startswith("$"):
        problems.append(ConfigError(f"{where} --host", host, "127.0.0.1, the head's private address" +
                                    (f" ({head_ip})" if local else " or 0.0.0.0 behind the security group"), source))
    return problems


def mlflow_port(config: dict) -> int:
    """The port the head's MLflow server listens on (`--port`, else MLflow's 5000)."""
    found = _mlflow_server(config)
    port = _option(_words(found[1]), "--port") if found else None
    return int(port) if port and port.isdigit() else 5000


def _summary(config: dict, path: str) -> list[str]:
    provider = config["provider"]
    where = provider.get("region") or provider.get("head_ip") or ""
    lines = [f"{path}: provider {provider['type']} {where}, cluster {config['cluster_name']}, "
             f"max {config['max_workers']} workers, idle timeout {config.get('idle_timeout_minutes')} min"]
    if provider["type"] == "local":
        lines.append(f"  nodes: head {provider['head_ip']}, workers {provider.get('worker_ips') or 'none'} "
                     f"(GPUs detected by `ray start` on each machine)")
        exposure = (f"Ray and MLflow (port {mlflow_port(config)}) listen on the head's address: "
                    "keep it behind your firewall")
    else:
        for name, node_type in config["available_node_types"].items():
            node_config = node_type.get("node_config", {})
            kind = node_config.get("InstanceType") or node_config.get("machineType") or "?"
            role = ("head" if name == config["head_node_type"]
                    else f"{node_type.get('min_workers', 0)}-{node_type.get('max_workers')}")
            lines.append(f"  {name}: {kind}, resources {node_type.get('resources') or 'detected'}, {role}")
        rules = provider.get("security_group", {}).get("IpPermissions", [])
        opened = ", ".join(sorted({str(r.get("FromPort")) for r in rules})) or "none beyond Ray's (SSH only)"
        exposure = f"inbound ports: {opened}"
    lines.append(f"  {exposure}; dashboard through `ray dashboard`, MLflow through an SSH tunnel; token auth on")
    return lines


def check_cluster_file(path: str | Path) -> CheckResult:
    """Ray's schema, then GPUs declared on GPU node types, no service port open to the internet,
    token auth, no usage stats, and an MLflow server on the head."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        return CheckResult([ConfigError("cluster file", source, f"a readable file ({error.strerror})")])
    except yaml.YAMLError as error:
        return CheckResult([ConfigError("cluster file", source, f"valid YAML ({one_line(error)})")])
    if not isinstance(raw, dict):
        return CheckResult([ConfigError("cluster file", source, "a YAML mapping of Ray cluster-launcher keys")])
    config, problems = _ray_config(raw, source)
    if config is None:
        return CheckResult(problems)
    ports = {**SERVICE_PORTS, mlflow_port(config): "MLflow"}
    problems = (_check_gpus(config, source) + _check_firewall(config, ports, source)
                + _check_head_commands(config, source))
    return CheckResult(problems, [] if problems else _summary(config, source))
