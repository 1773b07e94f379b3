"""`softprompt cluster check`, `submit` and `jobs status|logs|stop`: a cluster file checked offline
(search/cluster.py), and searches sent to a cluster's job API (search/jobs.py) and followed there."""
from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import yaml

from softprompt.errors import ConfigError
from softprompt.search.cluster import check_cluster_file
from softprompt.search.jobs import job_client, submit_search


def cmd_cluster_check(args) -> int:
    """Print every problem of a cluster file (one line each, exit 2), or its summary (exit 0)."""
    result = check_cluster_file(args.file)
    for problem in result.problems:
        print(f"softprompt: error: {problem}", file=sys.stderr)
    if result.problems:
        return 2
    print("\n".join(result.summary))
    return 0


def _known_job(args):
    """The cluster's job client and the job's info; an unknown job id is a one-line user error."""
    client = job_client(args.address)
    try:
        return client, client.get_job_info(args.job_id)
    except RuntimeError:
        raise ConfigError("job id", args.job_id, f"a job of the cluster at {args.address} "
                                                 f"(`ray job list --address {args.address}`)") from None


def follow_logs(client, job_id: str) -> int:
    """Print the job's output as it comes until the job ends; 0 if it succeeded, 1 otherwise."""
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on: `softprompt jobs stop {job_id}` ends it", file=sys.stderr)
        return 130
    return finish_status(client, job_id)


def finish_status(client, job_id: str) -> int:
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""), flush=True)
    return 0 if info.status.value == "SUCCEEDED" else 1


def cmd_submit(args) -> int:
    """Submit a search to a cluster, print the job id, then follow its logs unless --no-wait."""
    with tempfile.TemporaryDirectory(prefix="softprompt-job-") as scratch:
        job_id = submit_search(args.address, args.config, args.set, args.tracking_uri, Path(scratch))
    return submitted(args.address, job_id, args.no_wait)


def submitted(address: str, job_id: str, no_wait: bool) -> int:
    """Say a job was submitted; then follow its logs to its end, unless `no_wait`."""
    print(f"submitted job {job_id} to {address}", flush=True)
    if no_wait:
        print(f"follow it: softprompt jobs logs {job_id} --follow --address {address}")
        return 0
    return follow_logs(job_client(address), job_id)


def cmd_jobs_status(args) -> int:
    _, info = _known_job(args)
    print(yaml.safe_dump({"job": args.job_id, "status": info.status.value, "message": info.message,
                          "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time},
                         sort_keys=False).rstrip())
    return 0


def cmd_jobs_logs(args) -> int:
    client, _ = _known_job(args)
    if args.follow:
        return follow_logs(client, args.job_id)
    print(client.get_job_logs(args.job_id), end="")
    return 0


def cmd_jobs_stop(args) -> int:
    client, _ = _known_job(args)
    stopped = client.stop_job(args.job_id)
    print(f"job {args.job_id}: " + ("stop requested" if stopped else "already finished"))
    return 0


JOB_HANDLERS = {"status": cmd_jobs_status, "logs": cmd_jobs_logs, "stop": cmd_jobs_stop}
