"""`softprompt submit` and `softprompt jobs status|logs|stop`: a search sent to a Ray cluster as a job through
the head's job API. The job carries the `softprompt` package and the config, so the driver and every trial run
the code submitted; the cluster's venv supplies only the pinned dependencies. The search logs to the cluster's
MLflow server, whose address the head's start command exports as SOFTPROMPT_TRACKING_URI.
"""
from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

from softprompt.configfile import ConfigError, check_tracking_uri, load_yaml, parse_overrides
from softprompt.errors import one_line
from softprompt.package import copy_package
from softprompt.search.rules import STORAGE_PATH

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Expanded by the job's shell on the head; a head started without it fails the job with this message.
CLUSTER_TRACKING_URI = '"${SOFTPROMPT_TRACKING_URI:?is not set on the head: start Ray with the cluster file}"'
# glibc spreads a process's threads over up to 8 malloc arenas per core and keeps what was freed in
# them: after a few demo trials a Ray worker held 60+ arena heaps of 64 MiB (4.5 GiB) and the machine
# peaked at 8.8 GiB. With two arenas per worker the demo peaks at 5.5 GiB.
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}
JOB_ENV = {"TOKENIZERS_PARALLELISM": "false", **WORKER_ENV}


def job_client(address: str):
    """A client for the cluster's job API; an unreachable or refusing head is a one-line user error."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise ConfigError("--address", address, "a cluster whose token this machine has: RAY_AUTH_MODE=token and the "
                                                "head's ~/.ray/auth_token here (or RAY_AUTH_TOKEN)") from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError("--address", address,
                          f"the job API of a running cluster's head, e.g. {DEFAULT_ADDRESS} "
                          f"through `ray dashboard cluster.yaml` ({one_line(error)})") from None


def _staged_config(config: str, overrides: list[str], folder: Path) -> str:
    """Copy the config into the job's working dir; its storage_path must be S3 (search.storage keeps
    the driver's files there too) or an absolute path that every node mounts (NFS, EFS): a relative
    one would land in the job's temporary working dir and vanish."""
    values = load_yaml(config)
    storage = {**values, **parse_overrides(overrides)}.get("storage_path", STORAGE_PATH)
    if "://" not in str(storage) and not Path(str(storage)).is_absolute():
        raise ConfigError("storage_path", storage, "s3://BUCKET/PREFIX, or an absolute path on storage every node "
                                                   "mounts, e.g. /mnt/softprompt/runs (--set storage_path=...)",
                          source=config)
    name = Path(config).name
    shutil.copyfile(config, folder / name)
    return name


def entrypoint(words: list[str], tracking_uri: str | None) -> str:
    """The shell command the head runs: a softprompt command, logging to the given or the cluster's MLflow server."""
    command = " ".join(shlex.quote(w) for w in ["python", "-m", "softprompt", *words])
    return f"{command} --tracking-uri " + (shlex.quote(tracking_uri) if tracking_uri else CLUSTER_TRACKING_URI)


def submit_command(address: str, words: list[str], tracking_uri: str | None, working_dir: Path | None = None) -> str:
    """Submit `softprompt WORDS` as a Ray job carrying this project's code; returns its id."""
    if tracking_uri:  # Ray keeps the entrypoint and shows it: no credentials in it
        check_tracking_uri(tracking_uri)
    client = job_client(address)
    with tempfile.TemporaryDirectory() as staged:  # uploaded by submit_job
        runtime_env = {"py_modules": [str(copy_package(staged))], "env_vars": JOB_ENV,
                       **({"working_dir": str(working_dir)} if working_dir else {})}
        return client.submit_job(entrypoint=entrypoint(words, tracking_uri), runtime_env=runtime_env)


def submit_search(address: str, config: str, overrides: list[str], tracking_uri: str | None, scratch: Path) -> str:
    """Submit a search as a Ray job; returns its id."""
    # refused before any connection: unreadable YAML, a storage_path not on shared storage, and a
    # tracking URI carrying credentials; the rest of the config is checked on the head, where the
    # job fails with the same one line
    if tracking_uri:
        check_tracking_uri(tracking_uri)
    name = _staged_config(config, overrides, scratch)
    words = ["search", "run", name, *[w for pair in overrides for w in ("--set", pair)]]
    return submit_command(address, words, tracking_uri, scratch)
