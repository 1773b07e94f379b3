"""`softprompt serve` on a real Ray Serve: the MLflow model's answers for concurrent clients of two
tasks, batched across requests; a registry alias followed without a restart (and a prompt of another
backbone refused); a replica killed under load; malformed requests answered in one line."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import requests
import torch
from conftest import SOFTPROMPT, free_port, on_session_ray

from softprompt.errors import ConfigError
from softprompt.models.checkpoint import save_checkpoint
from softprompt.search.export import export_mlflow_model, write_bundle
from softprompt.serving.ray_serve import BadRequest, pass_chunks, read_body, request_rows
from softprompt.serving.settings import DEFAULTS, serve_settings

TASKS = {"reviews": ["negative", "positive"], "spam": ["ham", "spam"]}
TEMPLATES = {"reviews": "review: {text}\nsentiment:", "spam": "message: {text}\nspam:"}
TEXTS = ["a fine film", "dull", "win a free prize now, call this number", "see you at lunch",
         "the plot wanders but the acting is strong and the ending lands", "ok", "URGENT: your account",
         "two hours I will not get back", "call me when you land", "a warm, funny and wise film"]
GUARD_S = 240  # waits on a loaded machine: a guard against a hang, never a measured time


def rows(n: int, offset: int = 0) -> list[dict]:
    """n request rows, the two tasks alternating, texts of different lengths."""
    return [{"task": list(TASKS)[(i + offset) % 2], "text": TEXTS[(i + offset) % len(TEXTS)]} for i in range(n)]


def make_prompt(folder: Path, backbone, task: str, seed: int) -> Path:
    values = torch.randn(4, backbone.width, generator=torch.Generator().manual_seed(seed)) * 0.5
    return save_checkpoint(folder, values, {"backbone": backbone.name, "fingerprint": backbone.fingerprint,
                                            "task": task, "template": TEMPLATES[task], "verbalizers": TASKS[task],
                                            "labels": TASKS[task], "step": 0, "metrics": {},
                                            "config": {"max_length": 64}})


def post(url: str, body, timeout: float = GUARD_S) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps({"dataframe_records": body})
    return requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=timeout)


@contextmanager
def under_load(url: str, clients: int):
    """`clients` threads posting 2-row requests back to back while the block runs; yields the outcomes
    as they come: (status, parsed JSON or text, when it was sent), status "hung" for a request unanswered
    in GUARD_S."""
    outcomes, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = post(url, rows(2))
                outcomes.append((response.status_code,
                                 response.json() if response.status_code == 200 else response.text, sent))
            except requests.Timeout:
                outcomes.append(("hung", "", sent))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for thread in threads:
            thread.join(GUARD_S)


def wait_until(condition, deadline: float) -> None:
    """Poll `condition` until it holds or the monotonic `deadline` passes (a guard, not a measurement)."""
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def mlflow_answers(uri: str, version: int, request: list[dict]) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/served/{version}").predict(pd.DataFrame(request))


def assert_same_answers(predictions: list[dict], expected: pd.DataFrame) -> None:
    assert [p["label"] for p in predictions] == list(expected["label"])
    assert [p["task"] for p in predictions] == list(expected["task"])
    for p, (_, e) in zip(predictions, expected.iterrows()):
        for column in (c for c in expected.columns if c.startswith("score_")):
            if column in p:
                assert abs(p[column] - e[column]) <= 1e-5, (column, p[column], e[column])


# ---- without Ray ----

@pytest.mark.parametrize("body, status, words", [
    (b"", 400, "empty body"),
    (b"   ", 400, "empty body"),
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON list"),
    (b'{"rows": []}', 400, "dataframe_records"),
    (b'{"dataframe_records": []}', 400, "empty list"),
    (b'{"dataframe_records": [1]}', 400, "list of rows"),
    (b'{"dataframe_split": {"columns": ["text"], "data": [["a", "b"]]}}', 400, "as long as columns"),
    (b'{"inputs": [{"text": "' + b"x" * 3000 + b'"}]}', 413, "max_request_bytes"),
])
def test_a_malformed_body_is_refused_in_one_line_with_its_status(body, status, words):
    with pytest.raises(BadRequest) as refused:
        request_rows(body, 2048)
    assert refused.value.status == status and words in str(refused.value) and "\n" not in str(refused.value)


def test_the_three_body_forms_of_mlflow_give_the_same_rows():
    wanted = [{"text": "a", "task": "spam"}, {"text": "b", "task": "reviews"}]
    forms = [{"dataframe_records": wanted}, {"inputs": wanted},
             {"dataframe_split": {"columns": ["text", "task"], "data": [["a", "spam"], ["b", "reviews"]]}}]
    assert all(request_rows(json.dumps(f).encode(), 10_000) == wanted for f in forms)


def test_passes_hold_at_most_the_token_budget_and_keep_the_rows_order():
    assert pass_chunks([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert pass_chunks([], 7) == []


@pytest.mark.parametrize("field, value, allowed", [
    ("port", 0, "integer >= 1"), ("replicas", 0, "integer >= 1"), ("num_gpus", -1, ">= 0"),
    ("autoscaling", {"min_replicas": 3, "max_replicas": 1}, "min_replicas <= max_replicas"),
    ("autoscaling", {"replicas": 2}, "min_replicas"), ("colour", "red", "unknown field"),
    ("route_prefix", "serve", "starting with /"),
])
def test_a_bad_serve_setting_is_refused_naming_the_field(field, value, allowed, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({field: value}))
    with pytest.raises(ConfigError) as refused:
        serve_settings(str(config))
    assert field in str(refused.value) and allowed in str(refused.value)


def test_the_cli_refuses_a_bad_setting_and_an_unknown_model_in_one_line_exit_2(tmp_path):
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    for args, words in ((["x", "--set", "port=0"], "port = 0 is not allowed"),
                        (["nothing-here", *store], "model = 'nothing-here'"),
                        (["models:/x", *store], "models:/NAME@ALIAS")):
        done = subprocess.run([*SOFTPROMPT, "serve", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in done.stderr, done.stderr


# ---- on the session's Ray ----

@pytest.fixture(scope="module")
def registry(tiny_llama, tiny_t5, tmp_path_factory):
    """A registry holding `served` version 1 (two tasks, two prompts each, alias production)."""
    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"

    def bundle(name: str, seeds: tuple[int, ...], backbone=tiny_llama) -> Path:
        return write_bundle({task: [make_prompt(tmp / f"{name}-{task}-{s}", backbone, task, s) for s in seeds]
                             for task in TASKS}, tmp / name)

    first = bundle("v1", (1, 2))
    assert export_mlflow_model(first, "served", uri) == 1
    return SimpleNamespace(tmp=tmp, uri=uri, bundle=bundle, first=first, t5=tiny_t5)


@pytest.fixture(scope="module")
def served(ray_cluster, registry):
    """`run(name, source, **settings)`: an application at /name on the session's Serve; its URL."""
    from ray import serve

    from softprompt.serving.ray_serve import deployment
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def run(name: str, source: dict, **changes) -> str:
        settings = {**DEFAULTS, "num_cpus": 0.1, **changes}
        serve.run(deployment(settings).bind(source, settings), name=name, route_prefix=f"/{name}")
        return f"http://127.0.0.1:{port}/{name}"

    yield SimpleNamespace(run=run, port=port)
    serve.shutdown()


def alias_source(registry) -> dict:
    return {"model": "served", "alias": "production", "tracking_uri": registry.uri}


def test_concurrent_clients_of_two_tasks_share_the_next_pass_and_get_the_mlflow_models_answers(served, registry):
    # the pass of the first request reads the registry (refresh_s has passed), whose database another
    # connection holds locked: that pass waits (MLflow gives a locked sqlite database 20 s), and the 8 requests
    # sent meanwhile, seen waiting on the replica before the lock goes, all go in the next pass
    url = served.run("parity", alias_source(registry), refresh_s=0.1)
    database = sqlite3.connect(registry.uri.removeprefix("sqlite:///"), isolation_level=None)
    deadline = time.monotonic() + GUARD_S
    requests_rows = [rows(3, offset=i) for i in range(9)]  # 3 rows each, the two tasks mixed

    def replica(field: str) -> int:
        return requests.get(url, timeout=GUARD_S).json()[field]

    time.sleep(0.2)  # refresh_s since the replica last asked the registry, at least
    database.execute("BEGIN EXCLUSIVE")
    try:
        with ThreadPoolExecutor(9) as pool:
            first = pool.submit(post, url, requests_rows[0])
            wait_until(lambda: replica("in_pass") == 1, deadline)
            rest = [pool.submit(post, url, r) for r in requests_rows[1:]]
            wait_until(lambda: replica("waiting") == 8, deadline)
            assert (replica("in_pass"), replica("waiting"), first.done()) == (1, 8, False)
            database.execute("ROLLBACK")
            responses = [first.result()] + [f.result() for f in rest]
    finally:
        database.close()
    assert [r.status_code for r in responses] == [200] * 9
    answers = [r.json() for r in responses]
    assert [a["batched_requests"] for a in answers] == [1] + [8] * 8
    version = answers[0]["model_version"]  # the module's alias test may have moved it
    assert {a["model_version"] for a in answers} == {version}
    everything = [row for request in requests_rows for row in request]
    assert_same_answers([p for a in answers for p in a["predictions"]],
                        mlflow_answers(registry.uri, version, everything))
    assert (replica("in_pass"), replica("waiting")) == (0, 0)


def test_malformed_requests_get_a_4xx_naming_the_column_or_task(served, registry):
    url = served.run("plain", {"bundle": str(registry.first)})
    cases = [(post(url, [{"task": "spam", "txt": "hi"}]), 400, "needs the raw text column(s) ['text']"),
             (post(url, [{"task": "weather", "text": "hi"}]), 400, "unknown task(s) ['weather']"),
             (post(url, b""), 400, "empty body"),
             (post(url, [{"text": "x" * 10_000_000}]), 413, "max_request_bytes")]
    for response, status, words in cases:
        assert response.status_code == status and words in response.json()["error"], response.text
        assert "\n" not in response.json()["error"]
    assert post(url, rows(2)).status_code == 200  # and it still answers


def test_a_moved_alias_is_served_without_a_restart_no_request_fails_and_another_backbone_is_refused(served,
                                                                                                   registry):
    url = served.run("follow", alias_source(registry), refresh_s=0.2)
    before = requests.get(url, timeout=GUARD_S).json()
    assert before["model_version"] == 1 and before["tasks"] == list(TASKS)
    with under_load(url, 2) as results:
        deadline = time.monotonic() + GUARD_S
        wait_until(lambda: len(results) >= 4, deadline)
        assert export_mlflow_model(registry.bundle("v2", (3, 4)), "served", registry.uri) == 2  # alias -> 2
        wait_until(lambda: any(isinstance(body, dict) and body["model_version"] == 2 for _, body, _ in results[-4:]),
                   deadline)
        switched = len(results)
        wait_until(lambda: len(results) >= switched + 4, deadline)
    assert all(status == 200 for status, *_ in results), results
    versions = [body["model_version"] for _, body, _ in results]
    assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}, versions
    after = requests.get(url, timeout=GUARD_S).json()
    assert after["model_version"] == 2 and after["backbone_loaded_at"] == before["backbone_loaded_at"]
    answer = post(url, rows(6)).json()
    assert_same_answers(answer["predictions"], mlflow_answers(registry.uri, 2, rows(6)))

    # version 3 was trained on another backbone: refused in one line, version 2 goes on answering
    assert export_mlflow_model(registry.bundle("v3", (5,), registry.t5), "served", registry.uri) == 3
    deadline = time.monotonic() + GUARD_S
    while "refused" not in (answer := post(url, rows(2)).json()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert answer["model_version"] == 2 and "version 3" in answer["refused"] and "fingerprint" in answer["refused"]
    assert "\n" not in answer["refused"] and len(answer["predictions"]) == 2


def test_a_replica_killed_under_load_leaves_no_request_hanging_or_unexplained(served, registry):
    import ray
    # two replicas, from the config's autoscaling bounds (a minimum of 2), where the default is one
    url = served.run("pair", {"bundle": str(registry.first)}, autoscaling={"min_replicas": 2, "max_replicas": 2})
    with under_load(url, 4) as outcomes:
        deadline = time.monotonic() + GUARD_S
        wait_until(lambda: len(outcomes) >= 8, deadline)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "pair" in a["name"] and "PromptServer" in a["name"]]
        assert len(replicas) == 2, replicas
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        killed_at = len(outcomes)
        wait_until(lambda: len(outcomes) >= killed_at + 16, deadline)
    assert len(outcomes) >= killed_at + 16, "requests stopped being answered after the kill"
    assert not [o for o in outcomes if o[0] == "hung"]
    failed = [o for o in outcomes if o[0] != 200]
    assert all(status >= 500 and str(text).strip() for status, text, _ in failed), failed  # a clear error, if any
    # and the application answers on: the last requests sent were answered. (A request whose body the killed
    # replica had read is retried by Serve without it and ends in a 503 after body_timeout_s: it comes back
    # last, but was sent at the kill.)
    assert [status for status, *_ in sorted(outcomes, key=lambda o: o[2])[-8:]] == [200] * 8, failed


def test_a_body_that_never_arrives_gets_a_503_in_one_line_not_a_hang():
    """What a request that Serve's proxy retried after its replica died meets: the body the dead replica read
    is not sent again. Whether the kill above lands there is chance; this is that request, every time."""
    from starlette.requests import Request

    async def never() -> dict:
        await asyncio.sleep(3600)

    async def whole() -> dict:
        return {"type": "http.request", "body": b'{"inputs": []}', "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    with pytest.raises(BadRequest) as refused:
        asyncio.run(read_body(Request(scope, never), 0.2))
    assert refused.value.status == 503 and "did not arrive in 0.2 s" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert asyncio.run(read_body(Request(scope, whole), 0.2)) == b'{"inputs": []}'


def test_serve_status_and_stop_manage_an_application_on_a_cluster(served, registry, tmp_path):
    env = {**on_session_ray(), "PYTHONUNBUFFERED": "1"}
    deploy = subprocess.run([*SOFTPROMPT, "serve", "served", "--tracking-uri", registry.uri, "--set", "name=cli",
                             "--set", "route_prefix=/cli", "--set", "num_cpus=0.1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=GUARD_S * 2)
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    assert "models:/served@production (version" in deploy.stdout and f":{served.port}/cli" in deploy.stdout
    answer = post(f"http://127.0.0.1:{served.port}/cli", rows(2))
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
    status = subprocess.run([*SOFTPROMPT, "serve", "status"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=GUARD_S)
    assert status.returncode == 0 and "cli: RUNNING" in status.stdout, status.stdout + status.stderr[-2000:]
    stop = subprocess.run([*SOFTPROMPT, "serve", "stop", "--name", "cli"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=GUARD_S)
    assert stop.returncode == 0 and "stopped application 'cli'" in stop.stdout, stop.stderr[-2000:]
    again = subprocess.run([*SOFTPROMPT, "serve", "stop", "--name", "cli"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=GUARD_S)
    assert again.returncode == 2 and "--name = 'cli' is not allowed" in again.stderr, again.stderr[-2000:]


def test_serve_in_the_foreground_answers_and_stops_on_ctrl_c(registry, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    port = free_port()
    process = subprocess.Popen([*SOFTPROMPT, "serve", str(registry.first), "--set", f"port={port}",
                                "--set", "num_cpus=0"], cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               # started with SIGINT ignored, as a background job or a test runner's worker is:
                               # Ctrl-C must stop it all the same
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        lines = []
        for line in process.stdout:  # ends if the process does
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert any(f"127.0.0.1:{port}/" in line for line in lines), "".join(lines)[-3000:]
        answer = post(f"http://127.0.0.1:{port}/", rows(4))
        assert answer.status_code == 200
        assert_same_answers(answer.json()["predictions"], mlflow_answers(registry.uri, 1, rows(4)))
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=GUARD_S)[0]
        assert process.returncode == 0 and "softprompt: stopped" in rest, rest[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
