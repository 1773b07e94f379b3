"""`softprompt train`, `search run|resume|status|best|report`, `mlflow ui|sync`, `export` and `verify`:
the driver's commands, each a handler of parsed arguments (cli/main.py parses them)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from softprompt.configfile import ConfigError, check_fields, check_tracking_uri
from softprompt.search.rules import SEARCH_RULES, STORAGE_PATH, search_values


def cmd_train(args) -> int:
    """One prompt-tuning run: progress, then held-out metrics next to the zero-shot baseline."""
    from softprompt.models.backbone import load_backbone
    from softprompt.models.precision import dtype_note
    from softprompt.search.config import load_train_config
    from softprompt.trainables.loop import prepare_data, train_and_save

    cfg = load_train_config(args.config, args.set)
    backbone = load_backbone(cfg.model, cfg.dtype)
    print(f"backbone {cfg.model} ({backbone.model.config.model_type}, fingerprint {backbone.fingerprint}) "
          f"loaded in {backbone.load_seconds:.1f} s on {backbone.device}, {dtype_note(cfg.dtype, backbone.device)}"
          + (", compiled on first use" if cfg.compile else ""))
    data = prepare_data(cfg, backbone)
    sizes = ", ".join(f"{name} {len(split)}" for name, split in data.splits.items())
    print(f"task {data.name}: {sizes}; verbalizers {data.verbalizers}; template {data.template!r}")
    result, baseline = train_and_save(cfg, backbone, data)
    print(f"\n{'':24}{'accuracy':>10}{'f1':>8}")
    print(f"{'zero-shot (no prompt)':24}{baseline['accuracy']:>10.4f}{baseline['f1']:>8.4f}")
    print(f"{'prompt-tuned':24}{result['test_accuracy']:>10.4f}{result['test_f1']:>8.4f}"
          f"   (test split: {result['test_examples']} examples, best dev step {result['best_step']})")
    print(f"prompt saved to {Path(cfg.output_dir) / 'best'}")
    return 0


def _print_trials(rows: list[dict], metric: str) -> None:
    """`confirmed`: the metric on further dev examples, for trials run to the end (the winner is the best of those)."""
    from softprompt.search.console import shown_params

    def show(value):
        return f"{value:.4f}" if value is not None else "-"

    print(f"{'trial':<12}{'status':<15}{'step':>6}{metric:>20}{'confirmed':>11}{'test acc':>10}  parameters")
    for r in rows:
        print(f"{r['trial_id']:<12}{r['status']:<15}{r['step'] or '-':>6}{show(r['metric']):>20}"
              f"{show(r['confirmed']):>11}{show(r['test_accuracy']):>10}  "
              f"{shown_params(r['params'], r.get('lr_absolute'))}")


def _mean_sd(mean: float, sd: float | None) -> str:
    return f"{mean:.4f} ± {sd:.4f}" if sd is not None else f"{mean:.4f}"


def _print_points(points: list[dict], metric: str) -> None:
    """With seeds: each point's mean ± sd (sample) over its seeds, best first."""
    from softprompt.search.console import shown_params
    from softprompt.search.record import SEED

    print(f"\n{'point':<7}{'seeds':>6}{'mean ± sd ' + metric:>30}{'confirmed mean ± sd':>22}  parameters (trials)")
    for number, point in enumerate(points, 1):
        confirmed = _mean_sd(point["confirmed"], point["confirmed_sd"]) if point["confirmed"] is not None else "-"
        params = {k: v for k, v in point["trials"][0]["params"].items() if k != SEED}
        print(f"{number:<7}{point['n']:>6}{_mean_sd(point['metric'], point['sd']):>30}{confirmed:>22}  "
              f"{shown_params(params)} ({', '.join(r['trial_id'] for r in point['trials'])})")


def _zero_shot_verdict(summary: dict) -> str | None:
    """A line for a winner that does not beat the zero-shot baseline on test (None if it does)."""
    if summary["beats_zero_shot"]:
        return None
    return (f"the winner does not beat zero-shot ({summary['test_accuracy']:.4f} vs "
            f"{summary['zero_shot_test_accuracy']:.4f} test accuracy): the model does as well without this "
            f"prompt; a longer or wider search may find one that helps")


def _finish_search(storage_path: str, name: str, started: float | None = None, since: float | None = None) -> int:
    """After a search (new or resumed): the trial table, then the winner against zero-shot; then where the
    time of this process's run (from `started`) went; for a resume (`since`: its start, in epoch seconds),
    of the trials that ran in it."""
    from softprompt.search.record import ERRORED, UNFINISHED, SearchRecord
    from softprompt.search.verdict import judge_winner

    record = SearchRecord.load(storage_path, name)
    print()
    _print_trials(record.trials, record.config.metric)
    if not record.evaluated():
        print(f"\nno trial has been evaluated yet: `softprompt search resume {name}` continues the search")
        return 1
    judged = time.perf_counter()
    summary, data = judge_winner(record)
    confirmed = (f", {summary['confirmed']:.4f} on {len(data.splits.get('confirm', ()))} further dev examples"
                 if summary["confirmed"] is not None else "")
    metric = record.config.metric
    print(f"\nbest trial {summary['best_trial']}: {metric} {summary[metric]:.4f}{confirmed}")
    if record.config.seeds > 1:
        point = record.best()["point"]
        print(f"  its point: {metric} {_mean_sd(point['mean'], point['sd'])} over {point['n']} seeds")
    print(f"  held-out test accuracy  {summary['test_accuracy']:.4f}  "
          f"(task {data.name}, {summary['test_examples']} examples)")
    print(f"  zero-shot test accuracy {summary['zero_shot_test_accuracy']:.4f}  (same model, no prompt)")
    if verdict := _zero_shot_verdict(summary):
        print(f"  {verdict}")
    print(f"  prompt: {summary['prompt']}\n  summary: {record.summary_path}")
    if unfinished := sum(r["status"] in (UNFINISHED, ERRORED) for r in record.trials):
        print(f"\n{unfinished} trial(s) unfinished: `softprompt search resume {name}` continues them")
    _print_ui_hint(record)
    if started is not None:
        wall = time.perf_counter() - started
        print("\n" + _time_line(record.time_spent(wall, time.perf_counter() - judged, since), wall,
                                record.config.concurrency))
    return 0


def _print_ui_hint(record) -> None:
    """Where to look at the trials side by side: the MLflow UI's comparison of this search's trials."""
    from softprompt.search.tracking import is_server, load_target, ui_link

    target = load_target(record.storage)
    if target is None or target.parent_run_id is None:
        return
    try:
        link = ui_link(target)
    except Exception:  # the server went away since the search logged: `mlflow sync` says so, not this hint
        return
    if is_server(target.uri):
        print(f"  MLflow: {link}")
    else:
        where = "" if record.storage.storage_path == STORAGE_PATH else f" --storage-path {record.storage.storage_path}"
        print(f"  MLflow: `softprompt mlflow ui {record.storage.name}{where}`, then open {link}")


def _time_line(spent: dict[str, float], wall: float, slots: int) -> str:
    """One line: where the search's slot time went, largest first."""
    total = wall * slots
    parts = ", ".join(f"{label} {seconds / total:.0%}" for label, seconds in
                      sorted(spent.items(), key=lambda item: -item[1]) if seconds > 0)
    return f"time: {wall / 60:.1f} min x {slots} slots = {total:.0f} slot-s: {parts}"


def cmd_search_run(args) -> int:
    started = time.perf_counter()
    # what the file alone tells is refused before torch and Ray are imported, which takes seconds
    values = search_values(args.config, args.set)
    check_fields(values, SEARCH_RULES, args.config)
    if args.tracking_uri:
        check_tracking_uri(args.tracking_uri)

    import torch

    from softprompt.models.precision import dtype_note
    from softprompt.search.config import search_config
    from softprompt.search.tracking import default_tracking_uri
    from softprompt.search.tuner import run_search

    cfg = search_config(values, source=args.config, default_name=Path(args.config).stem)
    tracking_uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
    trials = (f"{cfg.trials} points x {cfg.seeds} seeds = {cfg.trials * cfg.seeds} trials" if cfg.seeds > 1
              else f"{cfg.trials} trials")

    def announce() -> None:  # run_search calls it once storage and resources are checked: a refusal comes alone
        print(f"search {cfg.name}: {trials} of up to {cfg.train.max_steps} steps, {cfg.concurrency} at a time, "
              f"space {cfg.space if isinstance(cfg.space, str) else 'custom'}"
              + (f" (a grid of {cfg.trials} cells)" if cfg.sampler == "grid" else "") + f", scheduler {cfg.scheduler}"
              + (f" (by {cfg.asha_metric})" if cfg.scheduler == "asha" and cfg.asha_metric != cfg.metric else "")
              + f", metric {cfg.metric}" + (", through one shared backbone per node" if cfg.shared_backbone else "")
              + f", {dtype_note(cfg.train.dtype, torch.device('cuda' if cfg.gpus_per_trial else 'cpu'))}"
              + (", compiled" if cfg.train.compile else "")
              + (f", tracked in {tracking_uri}" if tracking_uri else ""), flush=True)

    run_search(cfg, tracking_uri=tracking_uri, announce=announce, verbose=args.verbose)
    return _finish_search(cfg.storage_path, cfg.name, started)


def cmd_search_resume(args) -> int:
    from softprompt.search.tuner import resume_search

    started, since = time.perf_counter(), time.time()
    resume_search(args.storage_path, args.name, tracking_uri=check_tracking_uri(args.tracking_uri or "none"))
    return _finish_search(args.storage_path, args.name, started, since)


def cmd_search_status(args) -> int:
    from softprompt.search.record import SearchRecord

    record = SearchRecord.load(args.storage_path, args.name)
    cfg = record.config
    _print_trials(record.trials, cfg.metric)
    if cfg.seeds > 1 and record.evaluated():
        _print_points(record.points(), cfg.metric)
    counts = ", ".join(f"{count} {status}" for status, count in sorted(record.statuses().items()))
    planned = (f"{cfg.trials * cfg.seeds} trials ({cfg.trials} points x {cfg.seeds} seeds)" if cfg.seeds > 1
               else f"{cfg.trials} trials")
    print(f"\n{args.name}: {len(record.trials)} of {planned} started ({counts})")
    return 0


def cmd_search_report(args) -> int:
    """Each searched parameter's effect on the metric (mean ± sd by value): table and plot."""
    from softprompt.search.record import SearchRecord
    from softprompt.search.report import write_report

    report = write_report(SearchRecord.load(args.storage_path, args.name))
    print(report.text)
    print(f"table: {report.table}\nplot:  {report.plot}"
          + (f"\nboth logged on MLflow run {report.run_id} (report/)" if report.run_id else ""))
    return 0


def cmd_mlflow_ui(args) -> int:
    """The MLflow UI on a search's local store, and the link to its trials' runs table."""
    import subprocess

    import requests

    from softprompt.search.storage import SearchStorage
    from softprompt.search.tracking import is_server, load_target, ui_link

    target = load_target(SearchStorage(args.storage_path, args.name))
    if target is None or target.parent_run_id is None:
        raise ConfigError("name", args.name, "a search tracked in MLflow (this one has no MLflow run; "
                                             "`softprompt mlflow sync NAME --tracking-uri URI` logs it)")
    if is_server(target.uri):
        print(f"search {args.name} is tracked on a server: open {ui_link(target)}")
        return 0
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", target.uri,
                               "--host", args.host, "--port", str(args.port), "--workers", "1"],
                              stdout=sys.stderr,  # this command's own output is the link
                              # one person's UI: one worker, no MLflow job runner (consumers nothing here uses)
                              env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ})
    try:
        for _ in range(240):
            if server.poll() is not None:
                print(f"softprompt: the MLflow UI did not start (exit code {server.returncode}); is port {args.port} "
                      f"free? `--port` picks another", file=sys.stderr)
                return 1
            try:
                requests.get(f"http://127.0.0.1:{args.port}/health", timeout=1)
                break
            except requests.RequestException:  # not listening yet, or not answering yet
                time.sleep(0.5)
        print(f"MLflow UI on {target.uri}; the search's trials: {ui_link(target, args.port)}\n"
              f"Ctrl-C stops it.", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


def cmd_mlflow_sync(args) -> int:
    """Log what an unreachable tracking server missed, and the search's final results."""
    from softprompt.search.record import SearchRecord
    from softprompt.search.tracking import finish_search_run

    uri = check_tracking_uri(args.tracking_uri) if args.tracking_uri else None
    target = finish_search_run(SearchRecord.load(args.storage_path, args.name), uri)
    if target is None:
        return 1
    print(f"search {args.name} synced to {target.uri} (parent run {target.parent_run_id})")
    return 0


def cmd_export(args) -> int:
    """Write a search's best prompt (or a trial's, a run's, the top k) as a PEFT adapter, an .npy
    array, or a registered MLflow model; several searches (each its task's top k) as one MLflow model
    that serves every task."""
    from softprompt.search.export import (
        ALIAS,
        export_mlflow_model,
        export_npy,
        export_peft_adapter,
        run_prompt,
        search_prompts,
        tasks_by_name,
        write_bundle,
    )
    from softprompt.search.record import SearchRecord
    from softprompt.search.tracking import default_tracking_uri

    if bool(args.search) == (args.run is not None):
        raise ConfigError("export source", args.search or args.run,
                          "a search name or --run RUN_ID "
                          "(one of them; several search names make one --format mlflow bundle)")
    if len(set(args.search)) < len(args.search):
        raise ConfigError("export source", args.search, "each search once (--top K ensembles one search's best K)")
    if len(args.search) > 1 and (args.format != "mlflow" or args.trial):
        raise ConfigError("export source", args.search, f"one search for --format {args.format}"
                          + (" and --trial" if args.trial else "") + "; several searches export as one --format mlflow "
                                                                     "bundle, a task per search")
    if args.top > 1 and args.format != "mlflow":
        raise ConfigError("--top", args.top, f"1 for --format {args.format} (an ensemble exports as --format mlflow)")
    uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
    with tempfile.TemporaryDirectory() as scratch:
        by_source = ({f"run {args.run}": [run_prompt(args.run, uri, Path(scratch))]} if args.run else
                     {search: search_prompts(SearchRecord.load(args.storage_path, search), args.trial, args.top)
                      for search in args.search})
        prompts = next(iter(by_source.values()))
        name = args.name or "-".join(args.search) or f"run-{args.run[:8]}"
        out = Path(args.out or f"runs/export/{name}")
        if args.format == "npy":
            print(f"prompt array: {export_npy(prompts[0], out)}")
        elif args.format == "peft":
            print(f"PEFT adapter: {export_peft_adapter(prompts[0], out)}")
        else:
            tasks = tasks_by_name(by_source)
            bundle = write_bundle(tasks, out, args.combine)
            version = export_mlflow_model(bundle, name, uri)
            counts = ", ".join(f"{task}: {len(members)} prompt(s)" for task, members in tasks.items())
            print(f"registered model {name} version {version} (alias {ALIAS}; {counts}; "
                  f"combine {args.combine}) in {uri}\n"
                  f"serve it: softprompt serve {name} --tracking-uri {uri} (Ray Serve), or MLFLOW_TRACKING_URI={uri} "
                  f"mlflow models serve -m models:/{name}@{ALIAS} --env-manager local")
    return 0


def cmd_verify(args) -> int:
    """Check a prompt checkpoint or export against its SHA-256 and, with --model, that backbone."""
    from softprompt.models.backbone import load_backbone
    from softprompt.search.export import load_export

    backbone = load_backbone(args.model) if args.model else None
    prompts = load_export(args.path, backbone and backbone.fingerprint, backbone and backbone.width)
    shapes = ", ".join("x".join(map(str, p.shape)) for p in prompts)
    print(f"{args.path}: {len(prompts)} prompt(s) [{shapes}], SHA-256 verified"
          + (f", made for {args.model} (fingerprint {backbone.fingerprint})" if backbone else ""))
    return 0


def cmd_search_best(args) -> int:
    """The best trial; with the summary `search run|resume` wrote for it, its test accuracy against zero-shot."""
    from softprompt.search.record import SearchRecord

    record = SearchRecord.load(args.storage_path, args.name)
    cfg, best = record.config, record.best()
    if summary := record.summary_of(best["trial_id"]):  # written for this winner
        best = {**best, **{k: summary[k] for k in ("test_accuracy", "zero_shot_test_accuracy", "beats_zero_shot")}}
    if args.json:
        print(json.dumps(best, indent=2, default=str))
        return 0
    print(f"{'best trial':<20}{best['trial_id']} ({best['status']})")
    print(f"{cfg.metric:<20}{best['metric']:.4f}")
    if best["confirmed"] is not None:
        print(f"{'confirmed':<20}{best['confirmed']:.4f}  (on up to {cfg.train.confirm_examples} further dev examples)")
    if point := best.get("point"):  # with seeds, the winner is the point with the best mean
        print(f"{'point mean ± sd':<20}{_mean_sd(point['mean'], point['sd'])}  ({cfg.metric} over {point['n']} seeds: "
              f"{', '.join(point['trials'])})")
        if point["confirmed_mean"] is not None:
            print(f"{'confirmed mean ± sd':<20}{_mean_sd(point['confirmed_mean'], point['confirmed_sd'])}")
    if best["test_accuracy"] is not None:
        print(f"{'test accuracy':<20}{best['test_accuracy']:.4f}")
    if "beats_zero_shot" in best:
        print(f"{'zero-shot accuracy':<20}{best['zero_shot_test_accuracy']:.4f}  (same model, no prompt)")
        if verdict := _zero_shot_verdict(best):
            print(verdict)
    for key, value in best["params"].items():
        print(f"  {key:<18}{value}")
    print(f"{'prompt':<20}{best['prompt']}")
    return 0
