"""Ray Serve (`softprompt serve`) against `mlflow models serve`, side by side in one run, on one
registered bundle of two tasks: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients,
each client sending one-row requests back to back, the two tasks mixed. Writes
bench/results/serve.{md,json}.

    python bench/bench_serve.py [--model smollm2-135m] [--seconds 20] [--clients 1 8 32]

Both servers run on this machine with the defaults a user gets, except that the Ray Serve replica is
given every core (`num_cpus` = the cores; its default of 1 would leave torch one thread, where
MLflow's process uses them all). The prompts are random: scoring costs the same for any values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

from softprompt.models.backbone import load_backbone
from softprompt.models.checkpoint import save_checkpoint
from softprompt.search.export import export_mlflow_model, write_bundle

RESULTS = Path(__file__).parent / "results"
TASKS = {"reviews": (["negative", "positive"], "review: {text}\nsentiment:"),
         "spam": (["ham", "spam"], "message: {text}\nspam:")}
TEXTS = ["A gripping, beautifully acted film.", "Two hours I will never get back.",
         "WINNER!! You have been selected for a free cruise, reply YES to claim now",
         "Are we still on for lunch tomorrow? I can bring the notes from class.",
         "The plot wanders in the middle, but the last act lands every emotional beat it set up.",
         "ok see you there", "Dull.", "URGENT: your account is locked, verify your details at this link today",
         "A warm, funny and wise film about growing up, with two lead performances that carry it.",
         "Call me when you land and I'll pick you up at the station"]


def bundle(model: str, folder: Path, prompt_length: int) -> Path:
    backbone = load_backbone(model, "float32")
    members = {}
    for task, (verbalizers, template) in TASKS.items():
        values = torch.randn(prompt_length, backbone.width, generator=torch.Generator().manual_seed(len(task)))
        meta = {"backbone": backbone.name, "fingerprint": backbone.fingerprint, "task": task, "template": template,
                "verbalizers": verbalizers, "labels": verbalizers, "step": 0, "metrics": {},
                "config": {"max_length": 256}}
        members[task] = [save_checkpoint(folder / f"{task}-prompt", values * 0.1, meta)]
    return write_bundle(members, folder / "bundle")


def pass_costs(folder: Path, sizes=(1, 2, 4, 8, 16, 32), rounds: int = 3) -> dict:
    """Milliseconds per request for a pass of n one-row requests, in this process, the two tasks and the texts
    mixed as the clients send them: what a server saves by scoring concurrent requests together."""
    from softprompt.serving.ensemble import load_bundle
    from softprompt.serving.rows import model_inputs
    ensemble, record = load_bundle(folder)
    costs = {}
    for n in sizes:
        names = [list(TASKS)[i % 2] for i in range(n)]
        inputs = model_inputs(record, ensemble.backbone.tokenizer, ensemble.backbone.is_encoder_decoder, names,
                              [{"task": t, "text": TEXTS[i % len(TEXTS)]} for i, t in enumerate(names)])
        ensemble.predict(names, inputs)  # warm
        timings = []
        for _ in range(rounds):
            started = time.perf_counter()
            ensemble.predict(names, inputs)
            timings.append(1000 * (time.perf_counter() - started) / n)
        costs[str(n)] = statistics.median(timings)
    return costs


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, body: dict, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({process.returncode}); its log: {process.args[0]} ... in the "
                             f"scratch folder's *.log")
        try:
            if requests.post(url, json=body, timeout=30).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit(f"{url}: not ready after {limit_s:.0f} s")


def load(url: str, clients: int, seconds: float) -> dict:
    """`clients` threads posting one-row requests back to back for `seconds`: requests/s, latency."""
    latencies, failures, batched, stop = [], [], [], threading.Event()

    def client(number: int):
        i = number
        while not stop.is_set():
            task = list(TASKS)[i % 2]
            body = {"dataframe_records": [{"task": task, "text": TEXTS[i % len(TEXTS)]}]}
            started = time.perf_counter()
            response = requests.post(url, json=body, timeout=300)
            (latencies if response.status_code == 200 else failures).append(time.perf_counter() - started)
            if response.status_code == 200 and isinstance(response.json(), dict):  # Ray Serve says its batch
                batched.append(response.json().get("batched_requests", 1))
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "failed": len(failures), "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "mean_batched_requests": statistics.mean(batched) if batched else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.md")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    folder = bundle(args.model, scratch, args.prompt_length)
    export_mlflow_model(folder, "bench", uri)
    bin_dir = Path(sys.executable).parent  # on PATH: `mlflow models serve` starts uvicorn by name
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    ports = {"mlflow": free_port(), "ray_serve": free_port()}
    urls = {"mlflow": f"http://127.0.0.1:{ports['mlflow']}/invocations",
            "ray_serve": f"http://127.0.0.1:{ports['ray_serve']}/"}
    commands = {
        "mlflow": [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/bench@production", "--env-manager",
                   "local", "-p", str(ports["mlflow"]), "-h", "127.0.0.1"],
        "ray_serve": [str(bin_dir / "softprompt"), "serve", "bench", "--tracking-uri", uri,
                      "--set", f"port={ports['ray_serve']}", "--set", f"num_cpus={cores}"]}
    warm = {"dataframe_records": [{"task": "reviews", "text": TEXTS[0]}]}
    results = {"model": args.model, "prompt_length": args.prompt_length, "cores": cores, "seconds": args.seconds,
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "pass_ms_per_request": pass_costs(folder), "runs": {}}
    print("pass, ms per one-row request:", {n: round(ms, 1) for n, ms in results["pass_ms_per_request"].items()})
    try:
        for name, command in commands.items():  # one server at a time: each gets the whole machine
            log = (scratch / f"{name}.log").open("w")
            process = subprocess.Popen(command, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                wait_ready(urls[name], process, warm)
                load(urls[name], 1, 3)  # warm-up
                for clients in args.clients:
                    run = load(urls[name], clients, args.seconds)
                    results["runs"].setdefault(name, {})[str(clients)] = run
                    print(f"{name} {clients} clients: {run['requests_per_s']:.1f} req/s, p50 {run['p50_ms']:.0f} ms, "
                          f"p99 {run['p99_ms']:.0f} ms, {run['failed']} failed", flush=True)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGINT)
                    try:
                        process.wait(120)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
                log.close()
    finally:
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write(results, args.out)
    print(args.out.read_text())


def write(results: dict, out: Path) -> None:
    runs = results["runs"]
    lines = ["# Ray Serve against `mlflow models serve`", "",
             f"`python bench/bench_serve.py`: one bundle of two tasks on {results['model']} (prompts of "
             f"{results['prompt_length']} tokens), {results['cores']} CPU cores, torch {results['torch']}. Each client "
             f"posts one-row requests back to back for {results['seconds']:.0f} s, the two tasks alternating; the "
             "servers run one at a time, each with the whole machine (the Ray Serve replica: num_cpus = the cores).",
             "", "| clients | MLflow req/s | Ray Serve req/s | ratio | MLflow p50 / p99 ms | Ray Serve p50 / p99 ms "
             "| requests per Ray Serve pass (mean over requests) | failed (MLflow, Ray Serve) |",
             "|---|---|---|---|---|---|---|---|"]
    for clients in runs.get("mlflow", {}):
        m, r = runs["mlflow"][clients], runs.get("ray_serve", {}).get(clients)
        if r is None:
            continue
        lines.append(f"| {clients} | {m['requests_per_s']:.1f} | {r['requests_per_s']:.1f} | "
                     f"{r['requests_per_s'] / m['requests_per_s']:.2f}x | {m['p50_ms']:.0f} / {m['p99_ms']:.0f} | "
                     f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} | {r['mean_batched_requests'] or 1:.1f} | "
                     f"{m['failed']}, {r['failed']} |")
    costs = results.get("pass_ms_per_request", {})
    if costs:
        lines += ["", "What a pass costs per request on this machine, scored in the bench's own process (the ensemble "
                  "both servers use; median of 3): " + ", ".join(f"{n} requests {ms:.0f} ms" for n, ms in costs.items())
                  + "."]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
