"""The `softprompt` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from adaptation.config import AdaptConfig  # numpy and yaml: no torch, no ray
from search.configfile import SEARCH_RULES, STORAGE_PATH, ConfigError, check_fields, check_tracking_uri, search_values
from search.jobs import DEFAULT_ADDRESS  # yaml and the config file helpers: no torch, no ray, for a fast --help
from trainables.errors import UserError, one_line


def cmd_train(args) -> int:
    """One prompt-tuning run: progress, then held-out metrics next to the zero-shot baseline."""
    from search.config import load_train_config
    from trainables.backbone import dtype_note, load_backbone
    from trainables.loop import prepare_data, train_and_save

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
    """`confirmed`: the metric on further dev examples, for trials that ran to the end (the winner
    is the best of those)."""
    from search.console import shown_params

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
    from search.console import shown_params
    from search.record import SEED

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
    from search.record import ERRORED, UNFINISHED, SearchRecord
    from search.verdict import judge_winner

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
    from search.tracking import is_server, load_target, ui_link

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

    from search.config import search_config
    from search.tracking import default_tracking_uri
    from search.tuner import run_search
    from trainables.backbone import dtype_note

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
    from search.tuner import resume_search

    started, since = time.perf_counter(), time.time()
    resume_search(args.storage_path, args.name, tracking_uri=check_tracking_uri(args.tracking_uri or "none"))
    return _finish_search(args.storage_path, args.name, started, since)


def cmd_search_status(args) -> int:
    from search.record import SearchRecord

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
    from search.record import SearchRecord
    from search.report import write_report

    report = write_report(SearchRecord.load(args.storage_path, args.name))
    print(report.text)
    print(f"table: {report.table}\nplot:  {report.plot}"
          + (f"\nboth logged on MLflow run {report.run_id} (report/)" if report.run_id else ""))
    return 0


def cmd_mlflow_ui(args) -> int:
    """The MLflow UI on a search's local store, and the link to its trials' runs table."""
    import subprocess

    import requests

    from search.storage import SearchStorage
    from search.tracking import is_server, load_target, ui_link

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
    from search.record import SearchRecord
    from search.tracking import finish_search_run

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
    from search.export import (
        ALIAS,
        export_mlflow_model,
        export_npy,
        export_peft_adapter,
        run_prompt,
        search_prompts,
        tasks_by_name,
        write_bundle,
    )
    from search.record import SearchRecord
    from search.tracking import default_tracking_uri

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
    from search.export import load_export
    from trainables.backbone import load_backbone

    backbone = load_backbone(args.model) if args.model else None
    prompts = load_export(args.path, backbone and backbone.fingerprint, backbone and backbone.width)
    shapes = ", ".join("x".join(map(str, p.shape)) for p in prompts)
    print(f"{args.path}: {len(prompts)} prompt(s) [{shapes}], SHA-256 verified"
          + (f", made for {args.model} (fingerprint {backbone.fingerprint})" if backbone else ""))
    return 0


def cmd_search_best(args) -> int:
    """The best trial; with the summary `search run|resume` wrote for it, its test accuracy against zero-shot."""
    from search.record import SearchRecord

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


def _command_group(commands, name: str, help: str, description: str):
    """A command whose actions (`search run`, `jobs logs`, ...) are subcommands: their subparsers."""
    group = commands.add_parser(name, help=help, description=description)
    return group.add_subparsers(dest="action", required=True, metavar="ACTION")


def _storage_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-path", default=STORAGE_PATH, help=f"where searches live (default: {STORAGE_PATH})")


def _config_arguments(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    parser.add_argument("config", help=what)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field, e.g. --set {example} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description="Hyperparameter search for prompt tuning (Lester et al. 2021): a frozen language "
                    "model, a trained soft prompt, Ray Tune trials over Optuna search spaces.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="run one prompt-tuning run from a YAML config",
                                description="Train one soft prompt and print held-out metrics. "
                                            "CONFIG holds TrainConfig fields (see examples/train.yaml).")
    _config_arguments(train, "YAML file of training fields", "max_steps=50")
    train.set_defaults(handler=cmd_train)

    actions = _command_group(commands, "search", "run, resume and inspect hyperparameter searches",
                             "Ray Tune trials over an Optuna search space, ASHA early stopping.")
    run = actions.add_parser("run", help="start a search from a YAML config (see examples/demo.yaml)",
                             description="Start a search. Results go to STORAGE_PATH/NAME; Ctrl-C stops it "
                                         "and `softprompt search resume NAME` continues it.")
    _config_arguments(run, "YAML search config", "trials=4")
    run.add_argument("--tracking-uri", metavar="URI",
                     help="MLflow tracking: sqlite:///PATH, http://HOST:PORT of a tracking server, or none "
                          "(default: sqlite:///mlflow.db in the working folder)")
    run.add_argument("--verbose", action="store_true",
                     help="also print Ray Tune's own trial tables (by default: a line per trial event)")
    run.set_defaults(handler=cmd_search_run)
    for action, handler, text in (
            ("resume", cmd_search_resume, "continue an interrupted search: finished trials are kept, "
                                          "running ones resume from their last checkpoint"),
            ("status", cmd_search_status, "show every trial of a search: status, step, metric, parameters"),
            ("best", cmd_search_best, "show the best trial: its metric, parameters and prompt folder"),
            ("report", cmd_search_report, "write each parameter's effect on the metric (mean ± sd by value) as "
                                          "report.md and report.png in the search's folder and its MLflow run")):
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument("name", help="the search's name (its folder under --storage-path)")
        _storage_path_argument(sub)
        if action == "best":
            sub.add_argument("--json", action="store_true", help="print the best trial as JSON")
        if action == "resume":
            sub.add_argument("--tracking-uri", metavar="URI",
                             help="log to this MLflow server from now on (default: where the search logged)")
        sub.set_defaults(handler=handler)

    mlflow_actions = _command_group(
        commands, "mlflow", "MLflow tracking of searches",
        "Every search is tracked in MLflow: a parent run per search, a child run per trial.")
    sync = mlflow_actions.add_parser("sync", help="log what an unreachable tracking server missed", description=(
        "Replay the records trials spooled while the tracking server was unreachable, then log the search's final "
        "statuses, winner and plots. Safe to repeat."))
    sync.add_argument("name", help="the search's name (its folder under --storage-path)")
    _storage_path_argument(sync)
    sync.add_argument("--tracking-uri", metavar="URI", help="sync to this server instead of the search's own")
    sync.set_defaults(handler=cmd_mlflow_sync)
    ui = mlflow_actions.add_parser("ui", help="start the MLflow UI on a search's store and print its trials' link",
                                   description="Start the MLflow UI on the store a search logged to and print the link "
                                               "to its runs table, one row per trial. Ctrl-C stops it.")
    ui.add_argument("name", help="the search's name (its folder under --storage-path)")
    _storage_path_argument(ui)
    ui.add_argument("--port", type=int, default=5000, help="default: 5000")
    ui.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    ui.set_defaults(handler=cmd_mlflow_ui)

    export = commands.add_parser(
        "export", help="export winning prompts: PEFT adapter, .npy array, or a registered MLflow model",
        description="Export a search's best prompt (or --trial ID, or the --top K as one ensemble), or a tracked "
                    "run's prompt (--run). --format peft writes a folder peft.PeftModel.from_pretrained loads; npy "
                    "the bare [length, width] array; mlflow a pyfunc model registered under --name with alias "
                    "production (input: a DataFrame with the task's raw columns, e.g. text, which it formats with the "
                    "task's template; output: label and per-class scores). Several searches export as one mlflow "
                    "model that serves each search's task (a `task` column routes each row).")
    export.add_argument("search", nargs="*", help="the search's name (its folder under --storage-path); several, for "
                                                  "--format mlflow: one model that serves each search's task")
    export.add_argument("--format", choices=["peft", "npy", "mlflow"], default="peft", help="default: peft")
    export.add_argument("--trial", help="export this trial instead of the best one")
    export.add_argument("--top", type=int, default=1, metavar="K",
                        help="export the K best trials as one ensemble (mlflow format only)")
    export.add_argument("--combine", choices=["vote", "mean_logprob"], default="vote",
                        help="how an ensemble combines its prompts (default: majority vote)")
    export.add_argument("--run", metavar="RUN_ID", help="export the prompt of this MLflow run instead of a search")
    export.add_argument("--name", help="registered model name / output name (default: the search's name)")
    export.add_argument("--out", help="output path (default: runs/export/NAME)")
    _storage_path_argument(export)
    export.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow server for --run and --format mlflow (default: sqlite:///mlflow.db here)")
    export.set_defaults(handler=cmd_export)

    verify = commands.add_parser(
        "verify", help="check a prompt checkpoint or export: its SHA-256, and with --model its backbone",
        description="Check a prompt checkpoint folder, an exported .npy, PEFT adapter or MLflow bundle folder: "
                    "every prompt against its recorded SHA-256 and, with --model, the backbone's fingerprint.")
    verify.add_argument("path", help="checkpoint folder, .npy file, PEFT adapter folder or bundle folder")
    verify.add_argument("--model", help="the backbone the prompt must belong to (alias, hub id or folder)")
    verify.set_defaults(handler=cmd_verify)
    _add_lm_adapt_command(commands)
    _add_cluster_commands(commands)
    _add_serve_command(commands)
    return parser


def _handler(module: str, name: str):
    """A handler imported only when its command runs (torch-importing modules make `--help` slow)."""
    def run(args):
        import importlib
        return getattr(importlib.import_module(module), name)(args)
    return run


def _add_serve_command(commands) -> None:
    """`serve` (serving/deploy.py): exported prompts on Ray Serve."""
    serve = commands.add_parser(
        "serve", help="serve exported prompts on Ray Serve (HTTP JSON, the MLflow model's schema)",
        description="Serve a registered model (NAME: its production alias, or models:/NAME@ALIAS), a bundle folder "
                    "or a search's winner on Ray Serve: one frozen backbone per replica answers every task of the "
                    "bundle, concurrent requests are scored together, and a registry alias that moves to a new "
                    "version is served from the next batch on, without a restart. POST {\"dataframe_records\": "
                    "[{\"text\": ...}]} as to `mlflow models serve`. Without --address it starts a local Ray and "
                    "serves until Ctrl-C; with one it deploys onto that cluster and returns. `serve status` and "
                    "`serve stop` manage it.")
    serve.add_argument("target", metavar="NAME|models:/NAME@ALIAS|BUNDLE|SEARCH|status|stop",
                       help="what to serve, or `status` / `stop`")
    serve.add_argument("--config", help="YAML serve config: replicas or autoscaling, num_cpus and num_gpus per "
                                        "replica, port, batching (serving/deploy.py lists the fields)")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    serve.add_argument("--address", help="a Ray cluster to deploy onto (default: RAY_ADDRESS, else a local Ray)")
    serve.add_argument("--name", default="softprompt", help="with stop: the application (default: softprompt)")
    serve.add_argument("--tracking-uri", metavar="URI",
                       help="the MLflow registry (default: sqlite:///mlflow.db here)")
    serve.add_argument("--storage-path", default=STORAGE_PATH, help=f"where searches live (default: {STORAGE_PATH})")
    serve.set_defaults(handler=_handler("serving.deploy", "cmd_serve"))


def _add_lm_adapt_command(commands) -> None:
    """`lm-adapt` (adaptation/lm_adapt.py): the checkpoints a search's `checkpoints:` axis explores."""
    adapt = commands.add_parser(
        "lm-adapt", help="continue a span-corruption T5 as a language model (a Ray Train job)",
        description="LM adaptation (paper section 3.2, Figure 3d): continue training a span-corruption T5 with "
                    "T5's prefix-LM objective (a text prefix as input, its continuation as target), data parallel "
                    "over the cluster's GPUs (CPU workers where there is none), and save a loadable checkpoint "
                    "at each of --steps, with a manifest (OUT/lm-adapt.yaml) that a search config's checkpoints: "
                    "takes. Run again with the same --out, it resumes from its last state. Tracked in MLflow "
                    "(loss and tokens/s).")
    adapt.add_argument("model", help="a span-corruption T5: hub id (google/t5-v1_1-base) or local folder")
    adapt.add_argument("--corpus", required=True,
                       help="a hub id, a save_to_disk folder, or data files as a task mapping's dataset takes "
                            "them (a file, a folder, or a glob; .txt: a text per line)")
    adapt.add_argument("--steps", required=True,
                       help="save a checkpoint at each of these steps, e.g. 10000,50000,100000")
    adapt.add_argument("--out", required=True,
                       help="folder for the step-N checkpoints, the manifest and the job's state")
    defaults = AdaptConfig.__dataclass_fields__
    for flag, kind, text in (
            ("text_column", str, "the corpus column holding the text"),
            ("corpus_config", str, "a hub data set's configuration, e.g. wikitext-103-raw-v1"),
            ("workers", int, "data-parallel workers (default: one per GPU; on CPUs one per node)"),
            ("batch_size", int, "sequences per worker and step"),
            ("seq_len", int, "tokens per sequence, split at a random point into input and target"),
            ("lr", float, "T5X Adafactor's learning rate (constant)"), ("seed", int, "data order and dropout"),
            ("checkpoint_every", int, "save a resumable state this often (and at every --steps)"),
            ("log_every", int, "print and log loss and tokens/s this often")):
        default = defaults[flag].default
        adapt.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=default,
                           help=text + (f" (default: {default})" if default is not None else ""))
    adapt.add_argument("--tracking-uri", metavar="URI",
                       help="MLflow: sqlite:///PATH, http://HOST:PORT or none (default: sqlite:///mlflow.db here)")
    adapt.add_argument("--submit", action="store_true", help="run it on a Ray cluster as a job (--out and a local "
                                                             "--corpus on storage every node mounts)")
    adapt.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                       help="with --submit: the head's job API")
    adapt.add_argument("--no-wait", action="store_true", help="with --submit: print the job id and return")
    adapt.set_defaults(handler=_handler("adaptation.lm_adapt", "cmd_lm_adapt"))


def _add_cluster_commands(commands) -> None:
    """`cluster check`, `submit` and `jobs status|logs|stop` (search/cluster.py, search/jobs.py)."""
    address = os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS)
    address_help = f"the head's job API (default: {address}, where `ray dashboard cluster.yaml` forwards it)"
    cluster_actions = _command_group(commands, "cluster", "check a Ray cluster-launcher file before `ray up`",
                                     "Ray cluster files for searches (cluster.yaml, cluster-onprem.yaml).")
    check = cluster_actions.add_parser(
        "check", help="validate a cluster file offline",
        description="Ray's schema, then: GPUs declared on GPU node types, no dashboard/GCS/client/MLflow port open "
                    "to the internet, token auth, no usage stats, an MLflow server on the head. One line per problem.")
    check.add_argument("file", help="cluster-launcher YAML file")
    check.set_defaults(handler=_handler("search.cluster", "cmd_cluster_check"))

    submit = commands.add_parser(
        "submit", help="run a search on a Ray cluster as a job",
        description="Send a search to a cluster's job API (after `ray up`, forward it with `ray dashboard "
                    "cluster.yaml`), print the job id and follow its logs until it ends (exit 1 if it failed).")
    _config_arguments(submit, "YAML search config (its storage_path must be shared storage)", "trials=32")
    submit.add_argument("--address", default=address, help=address_help)
    submit.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow server the trials log to "
                             "(default: the cluster's, SOFTPROMPT_TRACKING_URI on the head)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.set_defaults(handler=_handler("search.jobs", "cmd_submit"))

    job_actions = _command_group(commands, "jobs", "status, logs or stop of a submitted search",
                                 "Searches submitted with `softprompt submit`, by job id.")
    for action, text in (("status", "the job's status and message"), ("logs", "the job's output so far"),
                         ("stop", "stop the job (its search can be resumed)")):
        sub = job_actions.add_parser(action, help=text, description=text)
        sub.add_argument("job_id", help="the id `softprompt submit` printed")
        sub.add_argument("--address", default=address, help=address_help)
        if action == "logs":
            sub.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        sub.set_defaults(handler=_handler("search.jobs", f"cmd_jobs_{action}"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args)
    except Exception as error:
        if args.debug or not isinstance(error, UserError):
            raise
        print(f"softprompt: error: {one_line(error, limit=None)}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt as interrupt:  # search.tuner.SearchInterrupted says how to resume
        print(f"softprompt: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
