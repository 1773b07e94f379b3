"""The cluster: `softprompt cluster check` on the shipped files and on broken copies (offline), and a
real `ray up` of the on-prem file against an sshd on 127.0.0.1: a search submitted as a Ray job,
its trials and winner in the head's MLflow server, the winner exported, an LM-adaptation job run the
same way, and `ray down` leaving no Ray process behind.

`ray down` runs a bare `ray stop` on the head, which stops every Ray process on that machine. So
the test's sshd, and with it everything the head runs, lives in a PID namespace of its own: that
`ray stop` cannot reach this test session's own Ray (the test checks it still runs tasks), nor any
other on the machine. Killing the namespace's init ends whatever is left, on failure too.

Nothing leaves this machine: SSH, the job API and MLflow are on 127.0.0.1, free ports keep the
cluster apart from any other here, and Ray's own processes talk over this machine's address (Ray
maps 127.0.0.1 to it), as any `ray.init()` does.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from conftest import free_port

from softprompt.models.manifest import read_manifest
from softprompt.search.cluster import check_cluster_file

ROOT = Path(__file__).parents[1]
SOFTPROMPT = [sys.executable, "-m", "softprompt"]
SSHD = Path("/usr/sbin/sshd")
RAY_PROCESS_MARKS = ("raylet", "gcs_server", "ray::", "ray/_private", "ray/dashboard", "ray/autoscaler",
                     "default_worker", "log_monitor", "runtime_env")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def write(config: dict, folder: Path, name: str = "cluster.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- cluster check, offline ----

@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_check_accepts_the_shipped_cluster_files(name):
    result = check_cluster_file(ROOT / name)
    assert [str(p) for p in result.problems] == []
    assert "token auth on" in result.summary[-1]


def _typo(c):
    c["idle_timout_minutes"] = c.pop("idle_timeout_minutes")


def _gpu_type_without_gpus(c):
    del c["available_node_types"]["gpu_1x_a10g"]["resources"]["GPU"]


def _dashboard_open_to_the_internet(c):
    c["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]


def _all_ports_open(c):
    c["provider"]["security_group"]["IpPermissions"] = [{"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]


def _head_without_mlflow(c):
    c["head_start_ray_commands"] = [cmd for cmd in c["head_start_ray_commands"] if "mlflow server" not in cmd]


def _dashboard_on_all_interfaces(c):
    c["head_start_ray_commands"][-1] += " --dashboard-host=0.0.0.0"


def _no_token_auth(c):
    command = c["worker_start_ray_commands"][-1]
    c["worker_start_ray_commands"][-1] = command.replace("export RAY_AUTH_MODE=token && ", "")


def _usage_stats_on(c):
    c["head_start_ray_commands"][-1] = c["head_start_ray_commands"][-1].replace("--disable-usage-stats", "")


def _node_type_typo(c):
    c["available_node_types"]["gpu_1x_a10g"]["max_worker"] = 4


def _mlflow_file_store(c):
    c["head_start_ray_commands"] = [cmd.replace("sqlite:///$HOME/mlflow/mlflow.db", "./mlruns")
                                    for cmd in c["head_start_ray_commands"]]


def _onprem_mlflow_on_all_interfaces(c):
    c["head_start_ray_commands"] = [cmd.replace("--host $SOFTPROMPT_HEAD_IP", "--host 0.0.0.0")
                                    for cmd in c["head_start_ray_commands"]]


BROKEN = [
    ("cluster.yaml", _typo, "idle_timout_minutes", "did you mean 'idle_timeout_minutes'"),
    ("cluster.yaml", _gpu_type_without_gpus, "available_node_types.gpu_1x_a10g.resources.GPU",
     "the GPU count of g5.xlarge"),
    ("cluster.yaml", _dashboard_open_to_the_internet, "provider.security_group.IpPermissions[0]",
     "no rule opening 8265 (Ray dashboard and job API) to 0.0.0.0/0"),
    ("cluster.yaml", _all_ports_open, "provider.security_group.IpPermissions[0]", "6379 (Ray GCS)"),
    ("cluster.yaml", _head_without_mlflow, "head_start_ray_commands", "starting the tracking server on the head"),
    ("cluster.yaml", _dashboard_on_all_interfaces, "head_start_ray_commands[3] --dashboard-host", "127.0.0.1"),
    ("cluster.yaml", _no_token_auth, "worker_start_ray_commands[1]", "RAY_AUTH_MODE=token"),
    ("cluster.yaml", _usage_stats_on, "head_start_ray_commands[3]", "--disable-usage-stats"),
    ("cluster.yaml", _node_type_typo, "available_node_types.gpu_1x_a10g", "Ray's cluster schema"),
    ("cluster.yaml", _mlflow_file_store, "head_start_ray_commands[2] --backend-store-uri", "a database"),
    ("cluster-onprem.yaml", _typo, "idle_timout_minutes", "did you mean 'idle_timeout_minutes'"),
    ("cluster-onprem.yaml", _head_without_mlflow, "head_start_ray_commands", "mlflow server"),
    ("cluster-onprem.yaml", _onprem_mlflow_on_all_interfaces, "head_start_ray_commands[2] --host",
     "the head's private address (192.168.1.10)"),
]


@pytest.mark.parametrize("name,breaks,field,allowed", BROKEN, ids=[f"{b[0]}-{b[1].__name__[1:]}" for b in BROKEN])
def test_cluster_check_rejects_a_broken_copy_naming_the_key_and_what_is_allowed(name, breaks, field, allowed, tmp_path):
    config = load(name)
    breaks(config)
    problems = check_cluster_file(write(config, tmp_path, name)).problems
    assert [p.field for p in problems] == [field], [str(p) for p in problems]
    assert allowed in str(problems[0]) and str(problems[0]).startswith(f"{tmp_path / name}: ")


def test_cluster_check_cli_prints_one_line_per_problem_and_exits_2(tmp_path):
    config = load("cluster.yaml")
    _gpu_type_without_gpus(config)
    _dashboard_open_to_the_internet(config)
    broken, good = _run_at_once([[*SOFTPROMPT, "cluster", "check", str(write(config, tmp_path))],
                                 [*SOFTPROMPT, "cluster", "check", str(ROOT / "cluster.yaml")]], timeout=120)
    assert broken.returncode == 2
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("softprompt: error: ") for line in lines), broken.stderr
    assert good.returncode == 0 and "g5.xlarge" in good.stdout, good.stderr


def test_submit_refuses_a_storage_path_that_not_every_node_shares_before_connecting():
    result = subprocess.run([*SOFTPROMPT, "submit", str(ROOT / "examples" / "demo.yaml"), "--address",
                             f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"softprompt: error: {ROOT / 'examples' / 'demo.yaml'}: storage_path = 'runs/search' is not allowed: "
        f"s3://BUCKET/PREFIX, or an absolute path on storage every node mounts, e.g. /mnt/softprompt/runs "
        f"(--set storage_path=...)"]


def test_jobs_commands_say_in_one_line_that_no_cluster_answers():
    address = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([*SOFTPROMPT, "jobs", "status", "raysubmit_x", "--address", address],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"softprompt: error: --address = '{address}' is not allowed: "
                                                   f"the job API of a running cluster's head"), result.stderr


# ---- ray up, submit, MLflow, export, ray down: real, on loopback ----

def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def _run_at_once(commands: list[list[str]], timeout: float, **kwargs) -> list[subprocess.CompletedProcess]:
    """Independent CLI calls side by side: each spends most of its time starting Python and Ray."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda command: _run(command, timeout, **kwargs), commands))


def _in_namespace(namespace: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{process.pid}/ns/pid") == namespace:
                found.append(process)
    return found


def _ray_processes(namespace: str) -> list[str]:
    commands = [" ".join(p.info["cmdline"] or []) for p in _in_namespace(namespace)]
    return [c for c in commands if any(mark in c for mark in RAY_PROCESS_MARKS)]


@contextlib.contextmanager
def isolated_sshd(folder: Path, public_key: str):
    """sshd on 127.0.0.1:22 (Ray's local provider has no SSH port setting) in a PID namespace of its
    own, logging root in by key with HOME set to a scratch folder. What the cluster runs lives in that
    namespace: `ray down`'s machine-wide `ray stop` sees only it, and ending sshd (the namespace's
    init) ends all of it, also when pytest itself is killed (--pdeathsig). Yields the namespace's id."""
    home = folder / "h"
    home.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    (folder / "authorized_keys").write_text(public_key)
    (folder / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort 22\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nAllowUsers root\nPermitRootLogin prohibit-password\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"SetEnv HOME={home}\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    with open(folder / "sshd.log", "w") as log:
        sshd = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "unshare", "--pid", "--fork", "--kill-child",
                                 "--mount-proc", str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")],
                                stdout=log, stderr=log)
    try:
        deadline = time.time() + 60
        while not _listening(22):
            assert sshd.poll() is None and time.time() < deadline, (folder / "sshd.log").read_text()
            time.sleep(0.2)
        init = psutil.Process(sshd.pid).children()[0]
        yield os.readlink(f"/proc/{init.pid}/ns/pid")
    finally:
        sshd.kill()  # --kill-child: its init, and so the whole namespace, goes with it
        sshd.wait(timeout=20)


def loopback_cluster_file(folder: Path, key: Path, token: Path, ports: dict[str, int]) -> Path:
    """cluster-onprem.yaml for this machine: head 127.0.0.1 and no workers, the test's user, key and
    token, free ports so that it cannot meet another Ray cluster here, and this venv on the login
    PATH (the file's own setup installs a fresh venv, which is not what this test is about)."""
    config = load("cluster-onprem.yaml")
    config["cluster_name"] = f"softprompt-test-{os.getpid()}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    config["file_mounts"] = {"~/softprompt": str(ROOT) + "/", "~/.ray/auth_token": str(token)}
    # The head's Ray and its jobs keep their files under the scratch HOME, not in this machine's /tmp.
    config["setup_commands"] = [f"echo 'export PATH={Path(sys.executable).parent}:$PATH RAY_TMPDIR=$HOME "
                                f"TMPDIR=$HOME' > ~/.bashrc"]
    config["head_setup_commands"] = [c.replace(":5000", f":{ports['mlflow']}") for c in config["head_setup_commands"]]
    extra = (f" --dashboard-agent-listen-port={ports['agent']} --min-worker-port=21000 --max-worker-port=21099"
             f" --num-cpus=2 --num-gpus=0")
    config["head_start_ray_commands"] = [
        c.replace("--port 5000", f"--port {ports['mlflow']}").replace("--port=6379", f"--port={ports['gcs']}")
         .replace("--dashboard-port=8265", f"--dashboard-port={ports['dashboard']}")
         .replace("--ray-client-server-port=10001", f"--ray-client-server-port={ports['client']}")
        + (extra if "ray start" in c else "")
        for c in config["head_start_ray_commands"]]
    assert all(str(p) in " ".join(config["head_start_ray_commands"]) for p in ports.values())
    return write(config, folder)


def _ssh_control_folder(cluster_name: str) -> Path:
    """Where `ray up` keeps its SSH master sockets: a path of its own under /tmp, as Ray's
    command_runner builds it (sha256 of user and cluster name, 10 hex digits each)."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:10]
    return Path(f"/tmp/ray_ssh_{digest(getpass.getuser())}") / digest(cluster_name)


def _remove_ssh_control_folder(cluster_name: str) -> None:
    folder = _ssh_control_folder(cluster_name)
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # only if no other cluster uses it


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.time() < deadline, f"{url} did not answer in {seconds} s"
            time.sleep(1)


def _missing_prerequisite() -> str | None:
    if not SSHD.is_file():
        return "openssh-server is not installed: apt-get install -y openssh-server rsync (`make test` does, as root)"
    if shutil.which("rsync") is None:
        return "rsync is not installed: apt-get install -y rsync (`make test` does, as root)"
    if os.geteuid() != 0 or _run(["unshare", "--pid", "--fork", "--mount-proc", "true"], timeout=10).returncode != 0:
        return ("needs root and PID namespaces (unshare): the head runs in one, so that `ray down`'s machine-wide "
                "`ray stop` cannot reach any other Ray")
    if _listening(22):
        return "127.0.0.1:22 is taken by another sshd, and Ray's local provider has no SSH port setting"
    return None


def skip_or_fail(missing: str | None, ci: bool) -> None:
    """A machine without what the loopback test needs: `make test` skips it, naming what is missing; CI
    (CI=true) fails it, since a skip there would hide a broken path."""
    if missing and ci:
        pytest.fail(missing)
    if missing:
        pytest.skip(f"{missing}; CI=true makes this a failure")


def test_without_rsync_the_loopback_test_skips_outside_ci_and_fails_in_ci(tmp_path, monkeypatch):
    """rsync is hidden by a PATH that holds everything else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(folder).iterdir():
            if tool.name != "rsync" and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{bin_dir}")
    missing = _missing_prerequisite()
    named = "openssh-server is not installed" if not SSHD.is_file() else "rsync is not installed"
    assert missing is not None and missing.startswith(named), missing
    with pytest.raises(pytest.skip.Exception, match=f"{named}.*CI=true makes this a failure"):
        skip_or_fail(missing, ci=False)
    with pytest.raises(pytest.fail.Exception, match=named):
        skip_or_fail(missing, ci=True)
    skip_or_fail(None, ci=True)  # nothing missing: the test runs, in CI or not
    skip_or_fail(None, ci=False)


@pytest.mark.serial  # `ray start --head` on a machine loaded by 4 test processes missed Ray's own start-up deadline
def test_ray_up_submit_track_export_and_ray_down_on_loopback(ray_cluster, tiny_llama_dir, tiny_t5_dir, tmp_path):
    skip_or_fail(_missing_prerequisite(), ci=os.environ.get("CI") == "true")
    session_ray = ray_cluster  # this session's own Ray: `ray down` must leave it running
    worker_pid = session_ray.remote(lambda: os.getpid())
    with contextlib.ExitStack() as cleanup:
        shared = Path(tempfile.mkdtemp(prefix="sp-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        cleanup.callback(shutil.rmtree, shared, ignore_errors=True)
        key = shared / "client_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        namespace = cleanup.enter_context(isolated_sshd(shared, key.with_suffix(".pub").read_text()))
        token = shared / "auth_token"
        token.write_text(secrets.token_hex(32))
        ports = {name: free_port() for name in ("gcs", "dashboard", "client", "mlflow", "agent")}
        cluster_file = loopback_cluster_file(shared, key, token, ports)
        cluster_name = load_cluster_name(cluster_file)
        cleanup.callback(_remove_ssh_control_folder, cluster_name)
        (shared / "client-tmp").mkdir()
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(shared / "client-tmp"),
               "TMPDIR": str(shared / "client-tmp"),  # `ray up`'s config cache and logs
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        ray = str(Path(sys.executable).parent / "ray")
        address = f"http://127.0.0.1:{ports['dashboard']}"

        cleanup.callback(_run, [ray, "down", "-y", str(cluster_file)], timeout=120, env=env, cwd=ROOT)
        started = time.time()
        up = _run([ray, "up", "-y", "--no-config-cache", str(cluster_file)], timeout=180, env=env, cwd=ROOT)
        up_seconds = time.time() - started
        assert up.returncode == 0, up.stdout[-8000:] + up.stderr[-3000:]
        tracking_uri = f"http://127.0.0.1:{ports['mlflow']}"
        _wait_for(f"{tracking_uri}/health", 240)  # a guard: `make test` runs 4 test processes at once

        model = shared / "tiny-llama"
        shutil.copytree(tiny_llama_dir, model)
        storage = shared / "runs"
        storage.mkdir()
        search = tmp_path / "cluster-search.yaml"
        search.write_text(yaml.safe_dump({
            "name": "cluster-tiny", "trials": 2, "max_steps": 4, "concurrency": 2, "scheduler": "none",
            "storage_path": str(storage), "seed": 0,
            "train": {"model": str(model), "task": "rotten_tomatoes", "batch_size": 4, "eval_every": 2,
                      "max_eval_examples": 16, "max_train_examples": 64, "confirm_examples": 8,
                      "max_test_examples": 16}}))
        started = time.time()
        submitted = _run([*SOFTPROMPT, "submit", str(search), "--address", address], timeout=240, env=env, cwd=tmp_path)
        job_seconds = time.time() - started
        assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-3000:]
        job_id = re.search(r"submitted job (\S+)", submitted.stdout).group(1)
        assert f"job {job_id}: SUCCEEDED" in submitted.stdout
        assert "unreachable" not in submitted.stdout and not list(storage.glob("*/mlflow-spool/*")), submitted.stdout
        jobs = ["--address", address]
        status, logs, stop, unknown = _run_at_once([
            [*SOFTPROMPT, "jobs", "status", job_id, *jobs], [*SOFTPROMPT, "jobs", "logs", job_id, *jobs],
            [*SOFTPROMPT, "jobs", "stop", job_id, *jobs],
            [*SOFTPROMPT, "jobs", "status", "raysubmit_nosuchjob", *jobs]],
            timeout=120, env=env)
        assert "status: SUCCEEDED" in status.stdout, status.stderr
        assert "best trial" in logs.stdout, logs.stderr
        assert stop.stdout.strip() == f"job {job_id}: already finished", stop.stderr
        assert unknown.returncode == 2 and unknown.stderr.startswith(
            "softprompt: error: job id = 'raysubmit_nosuchjob' is not allowed: a job of the cluster at"), unknown.stderr

        parent_run_id = _assert_tracked_on_the_head(tracking_uri, "cluster-tiny", trials=2)
        # The winner as a user without the cluster's storage gets it (from the head's MLflow server),
        # and as one on the head gets it (from the shared storage): the same array.
        from_mlflow, from_storage = _run_at_once([
            [*SOFTPROMPT, "export", "--run", parent_run_id, "--format", "npy", "--tracking-uri", tracking_uri,
             "--out", str(tmp_path / "from-mlflow.npy")],
            [*SOFTPROMPT, "export", "cluster-tiny", "--format", "npy", "--storage-path", str(storage),
             "--out", str(tmp_path / "from-storage.npy"), "--tracking-uri", "none"]],
            timeout=180, env=env, cwd=tmp_path)
        assert from_mlflow.returncode == 0, from_mlflow.stderr
        assert from_storage.returncode == 0, from_storage.stderr
        prompt = np.load(tmp_path / "from-mlflow.npy")
        assert prompt.ndim == 2 and prompt.shape[1] == 32 and np.isfinite(prompt).all()
        assert np.array_equal(prompt, np.load(tmp_path / "from-storage.npy"))

        # LM adaptation submitted like a search: a Ray Train job on the cluster, its checkpoints on shared storage
        t5, corpus, adapted = shared / "tiny-t5", shared / "corpus.txt", shared / "adapted"
        shutil.copytree(tiny_t5_dir, t5)
        corpus.write_text("\n".join(f"a film that was {'good ' * (i % 5)}and long, number {i}" for i in range(300)))
        job = _run([*SOFTPROMPT, "lm-adapt", str(t5), "--corpus", str(corpus), "--steps", "2,4", "--out", str(adapted),
                    "--workers", "1", "--batch-size", "4", "--seq-len", "32", "--log-every", "2", "--submit",
                    "--address", address], timeout=240, env=env, cwd=tmp_path)
        assert job.returncode == 0 and "SUCCEEDED" in job.stdout, job.stdout[-4000:] + job.stderr[-3000:]
        assert "lm-adapt step 4/4" in job.stdout and "1 worker" in job.stdout
        assert read_manifest(adapted)[0] == {str(adapted / "step-4"): 4, str(adapted / "step-2"): 2}

        assert _ray_processes(namespace), "the head's Ray should be running before `ray down`"
        started = time.time()
        down = _run([ray, "down", "-y", str(cluster_file)], timeout=120, env=env, cwd=ROOT)
        down_seconds = time.time() - started
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        deadline = time.time() + 60
        while _ray_processes(namespace) and time.time() < deadline:
            time.sleep(0.5)
        assert _ray_processes(namespace) == []
        _wait_for(f"{tracking_uri}/health", 30)  # the runs stay viewable; ending the namespace ends the server
        assert session_ray.get(worker_pid.remote(), timeout=60) > 0  # untouched by `ray down`
        print(f"ray up {up_seconds:.0f} s, job {job_seconds:.0f} s, ray down {down_seconds:.0f} s")


def load_cluster_name(path: Path) -> str:
    return yaml.safe_load(path.read_text())["cluster_name"]


def _assert_tracked_on_the_head(tracking_uri: str, name: str, trials: int) -> str:
    """The head's MLflow server holds the search's parent run, one child per trial with its
    parameters and metrics (logged by the trials themselves, from their workers), and the winner's
    prompt. Returns the parent run's id."""
    from mlflow import MlflowClient

    from softprompt.trainables.tracking import PARENT_TAG, TRIAL_TAG

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name("softprompt")
    parents = client.search_runs([experiment.experiment_id], f"tags.`softprompt.search` = '{name}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert len(children) == trials
    assert parent.data.tags["softprompt.best_trial"] in {c.data.tags[TRIAL_TAG] for c in children}
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"prompt_length", "init", "optimizer", f"lr/{child.data.params['optimizer']}"} <= set(child.data.params)
        assert 0 <= child.data.metrics["best_dev_accuracy"] <= 1
    # both trials ran to the end, so both were confirmed on further dev examples; the best of those won
    confirmed = {c.data.tags[TRIAL_TAG]: c.data.metrics["confirmed_dev_accuracy"] for c in children}
    assert parent.data.metrics["winner_confirmed_dev_accuracy"] == confirmed[parent.data.tags["softprompt.best_trial"]]
    assert confirmed[parent.data.tags["softprompt.best_trial"]] == max(confirmed.values())
    winner = [a.path for a in client.list_artifacts(parent.info.run_id, "winning_prompt")]
    assert "winning_prompt/prompt.safetensors" in winner
    return parent.info.run_id
