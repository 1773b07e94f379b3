"""A Ray Serve replica of exported prompts: one frozen backbone per replica answers every task of a
bundle, with the rows of concurrent requests scored together, and a registry alias followed without a
restart. The HTTP schema is the MLflow model's; answers, errors and the GET: docs/export-and-serving.md.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import yaml
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from softprompt.errors import one_line
from softprompt.models.checkpoint import CheckpointError
from softprompt.models.data import pass_chunks
from softprompt.serving.ensemble import load_bundle
from softprompt.serving.rows import RowError, answers, model_inputs

log = logging.getLogger("ray.serve")


class BadRequest(ValueError):
    """A request this server answers with a 4xx: one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def read_body(request: Request, timeout_s: float) -> bytes:
    """The request's body, or a 503 once `timeout_s` passes. Serve's proxy retries a request whose replica died
    on another replica, but the body the dead one read is not sent again: without a limit that request waits
    for it until the client gives up."""
    try:
        return await asyncio.wait_for(request.body(), timeout_s)
    except TimeoutError:
        raise BadRequest(f"the request's body did not arrive in {timeout_s:g} s (a retry after a replica failed "
                         f"loses it); send the request again", status=503) from None


def request_rows(body: bytes, max_bytes: int) -> list[dict]:
    """The rows of a request body in MLflow's JSON schema, or BadRequest naming what is wrong."""
    if len(body) > max_bytes:
        raise BadRequest(f"request body of {len(body):,} bytes is over this server's max_request_bytes "
                         f"({max_bytes:,})", 413)
    if not body.strip():
        raise BadRequest('empty body: send JSON {"dataframe_records": [{"text": "..."}]}')
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"the body is not JSON ({error.msg if hasattr(error, 'msg') else error})") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"the body is a JSON {type(payload).__name__}; expected an object with dataframe_records, "
                         "dataframe_split or inputs")
    if "dataframe_records" in payload or "inputs" in payload:
        key = "dataframe_records" if "dataframe_records" in payload else "inputs"
        rows = payload[key]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise BadRequest(f"{key} must be a list of rows, each an object of column: value")
    elif "dataframe_split" in payload:
        split = payload["dataframe_split"]
        if not isinstance(split, dict) or not isinstance(split.get("columns"), list) or \
                not isinstance(split.get("data"), list) or \
                not all(isinstance(r, list) and len(r) == len(split["columns"]) for r in split["data"]):
            raise BadRequest("dataframe_split must hold columns (a list) and data (rows, each as long as columns)")
        rows = [dict(zip(split["columns"], r)) for r in split["data"]]
    else:
        raise BadRequest(f"no rows: the body's keys are {sorted(payload)}; expected dataframe_records, "
                         "dataframe_split or inputs")
    if not rows:
        raise BadRequest("no rows: the request holds an empty list")
    return rows


class Served:
    """What a replica answers with: a bundle's ensemble and record, and the registry version it is."""

    def __init__(self, folder: Path, backbone=None, version: int | None = None):
        self.ensemble, self.record = load_bundle(folder, backbone)
        self.version = version


class PromptServer:
    """The deployment's class (wrapped by `deployment()`): `source` is {"bundle": FOLDER} or
    {"model": NAME, "alias": ALIAS, "tracking_uri": URI}."""

    def __init__(self, source: dict, settings: dict):
        self.source, self.settings = source, settings
        self.lock = threading.Lock()
        self.refused: str | None = None
        self.refused_version: int | None = None
        self.checked = time.monotonic()
        self.waiting: list[tuple[list[dict], asyncio.Future]] = []  # requests for the next pass
        self.passes: asyncio.Task | None = None
        self.in_pass = 0
        self.downloads = tempfile.mkdtemp(prefix="softprompt-serve-")
        if "bundle" in source:
            self.served = Served(Path(source["bundle"]))
        else:
            version = self._alias_version()
            self.served = Served(self._download(version), version=version)
        self.backbone_loaded_at = time.time()  # once per replica: a new version reuses it
        self.score.set_max_batch_size(settings["max_batch_size"])
        self.score.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])

    # ---- the registry alias ----

    def _alias_version(self) -> int:
        from mlflow import MlflowClient
        client = MlflowClient(self.source["tracking_uri"], registry_uri=self.source["tracking_uri"])
        return int(client.get_model_version_by_alias(self.source["model"], self.source["alias"]).version)

    def _download(self, version: int) -> Path:
        import mlflow
        mlflow.set_registry_uri(self.source["tracking_uri"])
        mlflow.set_tracking_uri(self.source["tracking_uri"])
        into = Path(self.downloads) / str(version)
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{self.source['model']}/{version}",
                                                         dst_path=str(into)))
        model = yaml.safe_load((local / "MLmodel").read_text())  # the bundle's folder, as export logged it
        return local / model["flavors"]["python_function"]["artifacts"]["bundle"]["path"]

    def follow_alias(self) -> None:
        """At most every `refresh_s`: if the alias names another version, serve it from the next pass
        on, on this replica's backbone; a version trained on another backbone is refused (kept in
        `refused` and logged once) and the one being served goes on."""
        if "model" not in self.source or time.monotonic() - self.checked < self.settings["refresh_s"]:
            return
        self.checked = time.monotonic()
        try:
            version = self._alias_version()
        except Exception as error:  # the registry is down: keep serving what is loaded
            log.warning("softprompt: could not read %s@%s (%s); serving version %s", self.source["model"],
                        self.source["alias"], one_line(error), self.served.version)
            return
        if version in (self.served.version, self.refused_version):
            return
        try:
            previous, self.served = self.served, Served(self._download(version), self.served.ensemble.backbone, version)
            self.refused = None
            shutil.rmtree(Path(self.downloads) / str(previous.version), ignore_errors=True)
            log.info("softprompt: now serving %s version %s", self.source["model"], version)
        except CheckpointError as error:
            self.refused_version = version
            self.refused = (f"models:/{self.source['model']}@{self.source['alias']} is version {version}, which "
                            f"this replica will not serve ({one_line(error)}); version "
                            f"{self.served.version} answers")
            log.warning("softprompt: %s", self.refused)
        except Exception as error:  # its files could not be read (yet): tried again at the next refresh
            log.warning("softprompt: could not load %s version %s (%s); serving version %s", self.source["model"],
                        version, one_line(error) or type(error).__name__, self.served.version)

    # ---- requests ----

    def _score_rows(self, requests: list[list[dict]]) -> list[dict]:
        """The requests' rows in passes of at most max_pass_tokens; per request, its answer or RowError's one line."""
        with self.lock:
            self.follow_alias()
            served = self.served
            backbone, record = served.ensemble.backbone, served.record
            default = next(iter(record["tasks"]))
            prepared, results = [], [None] * len(requests)
            for i, rows in enumerate(requests):
                names = [row.get("task", default) for row in rows]
                try:
                    inputs = model_inputs(record, backbone.tokenizer, backbone.is_encoder_decoder, names, rows)
                    prepared.append((i, names, inputs))
                except RowError as error:
                    results[i] = {"error": str(error)}
            names = [n for _, ns, _ in prepared for n in ns]
            inputs = [x for _, _, xs in prepared for x in xs]
            predictions = []
            for chunk in pass_chunks([len(x) for x in inputs], self.settings["max_pass_tokens"]):
                predictions += served.ensemble.predict([names[j] for j in chunk], [inputs[j] for j in chunk])
            start = 0
            for i, ns, _ in prepared:
                results[i] = {"predictions": answers(record, ns, predictions[start:start + len(ns)]),
                              "batched_requests": len(requests),
                              **({"model_version": served.version} if served.version is not None else {}),
                              **({"refused": self.refused} if self.refused else {})}
                start += len(ns)
            return results

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def score(self, requests: list[list[dict]]) -> list[asyncio.Future]:
        """Serve's batch joins the requests waiting for the next pass; each gets a future of its answer. Awaiting
        the pass here instead, Serve (2.60, ray-project/ray#64595) would go on forming batches while it ran,
        each of what arrived within batch_wait_timeout_s, and queue them: passes of 2 to 4 requests at 8 to 32
        clients. A pass takes every request waiting when the last one ended, up to max_batch_size."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self.waiting.extend(zip(requests, futures))
        if self.passes is None or self.passes.done():
            self.passes = asyncio.create_task(self._run_passes())
        return futures

    async def _run_passes(self) -> None:
        while self.waiting:
            size = self.settings["max_batch_size"]
            taken, self.waiting = self.waiting[:size], self.waiting[size:]
            self.in_pass = len(taken)
            try:
                results = await asyncio.to_thread(self._score_rows, [rows for rows, _ in taken])
            except Exception as error:  # every waiting request gets it, and the next pass runs
                results = [error] * len(taken)
            self.in_pass = 0
            for (_, future), result in zip(taken, results):
                if not future.done():  # its client may have gone
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)

    def info(self) -> dict:
        record = self.served.record
        return {"model_version": self.served.version, "tasks": list(record["tasks"]), "backbone": record["backbone"],
                "fingerprint": record["fingerprint"], "backbone_loaded_at": self.backbone_loaded_at,
                "refused": self.refused, "in_pass": self.in_pass, "waiting": len(self.waiting)}

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":  # what this replica serves
            return JSONResponse(self.info())
        try:
            rows = request_rows(await read_body(request, self.settings["body_timeout_s"]),
                                self.settings["max_request_bytes"])
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        result = await (await self.score(rows))
        return JSONResponse(result, status_code=400 if "error" in result else 200)

    def __del__(self):  # Serve calls it when the replica shuts down
        shutil.rmtree(self.downloads, ignore_errors=True)


def deployment(settings: dict):
    """The PromptServer deployment with the config's sizing (serving/settings.py validates it)."""
    options = {"ray_actor_options": {"num_cpus": settings["num_cpus"], "num_gpus": settings["num_gpus"]},
               "max_ongoing_requests": settings["max_ongoing_requests"]}
    if settings.get("autoscaling"):
        options["autoscaling_config"] = settings["autoscaling"]
    else:
        options["num_replicas"] = settings["replicas"]
    return serve.deployment(PromptServer, name="PromptServer", **options)
