"""The driver's side of shared backbones (backbone_server/): a search's servers, named by it, stopped when it ends."""
from __future__ import annotations

import hashlib
from pathlib import Path

import ray

from softprompt.backbone_server.server import NAMESPACE


def server_key(search: str, storage_path: str) -> str:
    """Names a search's servers: its name, and where it is stored (two searches in different folders
    may share a name; a local path is made absolute, as two drivers may start from different folders)."""
    where = storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())
    return f"{search}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def servers(key: str) -> list[str]:
    """The names of the live servers of the search `key` (server_key)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(f"{key}:")]


def stop_servers(key: str) -> None:
    """Stop the search's servers (the driver, when the search ends)."""
    for name in servers(key):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:  # gone meanwhile
            pass
