"""The ``mqgen`` command line: ``run``, ``status``, ``grid``, ``compare``, ``serve``, ``config show``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
import yaml

from infra.config import PRESETS, STAGES, ConfigError, PipelineConfig, resolve
from infra.secrets import redact_text

app = typer.Typer(no_args_is_help=True,
                  help="mqgen: MQ-VAE + Stackformer image generation as a resumable pipeline.\n\nExit codes: 0 done, "
                       "1 a stage (or command) failed, 2 a bad config or command line, 3 a full disk, 130 "
                       "interrupted.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configurations.")
app.add_typer(config_app, name="config")

PRESET_HELP = f"Preset: {', '.join(PRESETS)}."


def _version(value: bool) -> None:
    if value:
        from infra.tracking import git_commit, mqgen_version

        commit = git_commit()
        typer.echo(f"mqgen {mqgen_version()}" + (f" (git {commit[:12]})" if commit != "unknown" else ""))
        raise typer.Exit()


@app.callback()
def main(ctx: typer.Context, version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")) -> None:
    """mqgen: MQ-VAE + Stackformer image generation as a resumable pipeline."""
    if ctx.invoked_subcommand not in ("run", "grid", "serve"):  # those send MLflow's notes to their log file
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
STAGE_HELP = f"Stage: {', '.join(STAGES)}."


def _prepare_environment(cfg: PipelineConfig) -> None:
    """Local-backend defaults, set before Prefect is imported: Prefect's home under the run root (its
    temporary API server and database), no analytics. A user's PREFECT_API_URL / PREFECT_HOME win."""
    root = Path(cfg.run.root)
    if "://" not in cfg.run.root and "PREFECT_HOME" not in os.environ:
        home = (root / ".prefect").resolve()
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # to the log file; the console shows errors only
    # the stages' own INFO logs (logger "mqgen") also go to the Prefect API: the flow run's Logs tab shows them
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mqgen")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # progress threads, Ray callbacks


def _resolve_or_exit(preset: str, config: Path | None, overrides: list[str]) -> PipelineConfig:
    try:
        return resolve(preset, config, overrides)
    except ConfigError as e:
        typer.secho(redact_text(f"config error: {e}"), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


VERBOSE_HELP = "Show Ray / Prefect / MLflow messages at INFO on the console (they always go to the log file)."
DEBUG_HELP = "On failure, print the full traceback too (it is always in the log file)."


def _start_logging(cfg: PipelineConfig, command: str, verbose: bool) -> None:
    """Console and log files for this command (after Prefect is imported: it installs its console handler)."""
    import prefect  # noqa: F401 - imported for its logging set-up, which is replaced here

    from infra.console import setup_logging

    if verbose:
        os.environ["MQGEN_RAY_LOG_TO_DRIVER"] = "1"
    setup_logging(cfg.run.root, command, verbose=verbose)


# Exit codes of `mqgen run` / `mqgen grid` (docs/reliability.md): 0 done, 1 a stage failed, 2 a bad config or
# command line, 3 a full disk, 130 interrupted (Ctrl-C / SIGTERM).
EXIT_CODES = {"ConfigError": 2, "NoSpaceLeft": 3}


def _fail(e: BaseException, debug: bool) -> None:
    """Print one paragraph about a failure (no traceback unless ``--debug``) and exit non-zero."""
    import traceback

    from flows.pipeline import StageFailed, what_to_do
    from infra.console import log_path
    from infra.errors import original_error

    stage = e.stage if isinstance(e, StageFailed) else None
    cause = e.cause if isinstance(e, StageFailed) else original_error(e)
    where = f"stage {stage}" if stage else "mqgen"
    name = type(cause).__name__
    message = str(cause).strip() or name
    advice = what_to_do(cause)
    lines = [f"error: {where} failed: {name}: {message}"]
    if isinstance(e, StageFailed):
        lines.append(f"  config {e.config_hash}, run root {e.root}")
    lines.append(f"  what to do: {advice}")
    logs = [p for p in ((e.log_file if isinstance(e, StageFailed) else None), log_path()) if p]
    if logs:
        run = f" and MLflow run {e.mlflow_run_id} (artifact error/)" if isinstance(e, StageFailed) and \
            e.mlflow_run_id else ""
        lines.append(f"  full traceback: {logs[0]}{run}" + ("" if debug else "; --debug prints it here"))
    if debug:
        typer.echo(redact_text("".join(traceback.format_exception(cause))), err=True)
    typer.secho(redact_text("\n".join(lines)), fg=typer.colors.RED, err=True)
    raise typer.Exit(EXIT_CODES.get(name, 1))


def _summary(cfg: PipelineConfig, refs: dict[str, Any], seconds: float | None) -> None:
    """Where the results are: the evaluation, its pictures, the MLflow UI, the logs."""
    from infra.console import fmt_duration, log_path

    def rel(p: str | Path) -> str:
        """Relative to the current directory when inside it, else absolute."""
        try:
            r = os.path.relpath(p)
        except ValueError:
            return str(p)
        return str(p) if r.startswith("..") else r

    out = [f"finished {len(refs)} stage(s)" + (f" in {fmt_duration(seconds)}" if seconds is not None else "")
           + f" (config {cfg.hash()}, run root {rel(cfg.run.root)})"]
    ev = refs.get("evaluate")
    if ev is not None:
        m = ev.metrics or {}
        figs = ", ".join(f"{label} {m[k]:.2f}" for label, k in (("FID", "fid"), ("IS", "isc_mean"),
                         ("recon PSNR dB", "recon_psnr")) if isinstance(m.get(k), (int, float)))
        out.append(f"  evaluation: {rel(ev.evaluation_json)}" + (f"  ({figs})" if figs else ""))
        out.append(f"  pictures:   {rel(Path(ev.path) / 'pictures')}/")
    if "://" not in cfg.run.root and not os.environ.get("MLFLOW_TRACKING_URI"):
        db = Path(cfg.run.root) / "mlflow.db"
        mlflow_cli = rel(Path(sys.executable).parent / "mlflow")
        out.append(f"  MLflow UI:  {mlflow_cli} ui --backend-store-uri sqlite:///{db}  "
                   "(then open http://127.0.0.1:5000)")
    if log_path() is not None:
        out.append(f"  logs:       {rel(Path(log_path()).parent)}/")
    typer.echo("\n".join(out), err=True)


@app.command()
def run(
    overrides: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]...",
                                                    help="Dotted overrides, e.g. tokenizer.keep_ratio=0.75"),
    preset: str = typer.Option("fmnist", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config values."),
    only: str | None = typer.Option(None, "--only", help=f"Run one stage on cached inputs. {STAGE_HELP}"),
    from_stage: str | None = typer.Option(None, "--from", help=f"Force a rerun from this stage. {STAGE_HELP}"),
    as_json: bool = typer.Option(False, "--json", help="Print the stage references as JSON on stdout."),
    gc_keep_days: float | None = typer.Option(None, "--gc-keep-days", min=0.0,
                                              help="After the run, reclaim disk on the root like `mqgen gc --yes "
                                                   "--keep-days N` (never this config's outputs)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Run the pipeline (or part of it) for a configuration."""
    import time

    t0 = time.perf_counter()
    cfg = _resolve_or_exit(preset, config, overrides or [])
    _prepare_environment(cfg)  # before Prefect is imported: it reads its settings once, at import
    from flows.pipeline import cached_refs, collect_garbage, run_pipeline, select_stages, touch_outputs
    from infra.orchestration import start_local_api
    from infra.registry import pending as registry_pending

    try:
        stages = select_stages(only, from_stage)
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    try:
        done = {} if from_stage else cached_refs(cfg)
        if all(s in done for s in stages) and not registry_pending(done):  # nothing to compute: no Prefect
            # server, no Ray, no MLflow run (registrations a tracking outage deferred need the pipeline's run)
            typer.secho(f"all {len(stages)} stage(s) are done for config {cfg.hash()} (outputs verified); nothing "
                        "to run (--from STAGE forces a rerun)", err=True)
            refs = {s: done[s] for s in stages if done[s] is not None}
            seconds = None
            from infra.tracking import close_runs_of_dead_owners

            close_runs_of_dead_owners(cfg.run.root, cfg.run.experiment)  # a killed run's MLflow runs end KILLED
            touch_outputs(refs)  # used now: `mqgen gc` counts an output changed lately as in use
            if gc_keep_days is not None:
                collect_garbage(cfg, gc_keep_days)
        else:
            _start_logging(cfg, "run", verbose)
            typer.echo(redact_text(f"mqgen run: preset {cfg.preset}, config {cfg.hash()}, run root {cfg.run.root}"),
                       err=True)
            start_local_api()
            refs = run_pipeline(cfg, only=only, from_stage=from_stage, gc_keep_days=gc_keep_days)
            seconds = time.perf_counter() - t0
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one readable paragraph, the traceback in the log
        if isinstance(e, KeyboardInterrupt):
            typer.secho("interrupted: run the same command again to resume", fg=typer.colors.RED, err=True)
            raise typer.Exit(130) from None
        _fail(e, debug)
    if as_json:
        typer.echo(json.dumps({k: getattr(v, "to_dict", lambda v=v: v)() for k, v in refs.items()}, indent=2,
                              default=str))
    _summary(cfg, refs, seconds)


@app.command()
def grid(
    args: list[str] | None = typer.Argument(None, metavar="KEY=[V1,V2,...]... [KEY=VALUE]...",
                                               help="Grid axes (lists) and fixed overrides, e.g. "
                                                    "tokenizer.keep_ratio=[1.0,0.5]"),
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP + " Default fmnist; with an experiment "
                                         "file, replaces the file's preset."),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config values, or an experiment "
                                          "file (a union of grids: preset, set, grids; see experiments/)."),
    name: str = typer.Option("", "--name", help="Name of the grid's MLflow parent run."),
    report: Path | None = typer.Option(None, "--report", help="Also write the comparison report here."),
    part: list[str] | None = typer.Option(None, "--part", help="Only this grid of an experiment file "
                                             "(repeatable): run a long experiment in parts, then the whole file, "
                                             "which reuses every finished stage."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop every variant at the first failure (by "
                                   "default a failed variant stops alone and the others finish; exit 1)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Run an ablation grid: shared upstream stages once, the variants concurrently on Ray."""
    from infra.config import expand_experiment, expand_grid, is_experiment_file

    claims = False
    try:
        if config is not None and config.is_file() and is_experiment_file(config):
            experiment, variants = expand_experiment(config, args or [], parts=part, preset=preset)
            claims = experiment == "claims" and not part  # the claims' verdicts need the whole experiment
            title = experiment + (f" @ {preset}" if preset else "")
            name = name or (f"{title} (part: {', '.join(part)})" if part else title)
        else:
            if part:
                raise ConfigError("--part selects grids of an experiment file (--config experiments/...yaml)")
            variants = expand_grid(preset or "fmnist", config, args or [])
    except ConfigError as e:
        typer.secho(redact_text(f"config error: {e}"), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    _prepare_environment(variants[0].config)
    _start_logging(variants[0].config, "grid", verbose)
    typer.echo(f"grid: {len(variants)} variants: " + "; ".join(v.label for v in variants), err=True)
    from flows.grid import GridIncomplete, grid_result, run_grid
    from infra.orchestration import start_local_api

    incomplete = None
    try:
        start_local_api()
        result = run_grid(variants, name=name, fail_fast=fail_fast)
    except GridIncomplete as e:  # the finished variants' outcome is kept: summary and report, then exit 1
        incomplete, result = e, grid_result(e.result)
    except Exception as e:  # noqa: BLE001 - one readable paragraph, the traceback in the log
        _fail(e, debug)
    summary = {"grid_run_id": result.grid_run_id, "variants": dict(zip(result.labels, result.variant_run_ids)),
               "executions": result.executions}
    typer.echo(json.dumps({**summary, **({"failed": result.failed} if result.failed else {})}, indent=2))
    if report is not None:
        _compare(variants[0].config, result.grid_run_id, [], report, claims=claims)
    if incomplete is not None:
        from infra.console import log_path

        lines = [f"error: {len(result.failed)} of {len(result.labels)} grid variants failed; the others finished"
                 + (" and are in the report" if report is not None else "") + ":",
                 *(f"  {label}: {why}" for label, why in result.failed.items()),
                 ("  what to do: fix the cause, then run the same command again: the finished variants and every "
                  "finished stage are reused"),
                 f"  full tracebacks: {log_path()} and each failed variant's MLflow run (artifact error/)"]
        typer.secho(redact_text("\n".join(lines)), fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _compare(cfg: PipelineConfig, grid_run_id: str | None, run_ids: list[str], out: Path,
             claims: bool = False) -> None:
    from flows.report import NothingToCompare, collect, log_report, write_report
    from infra.tracking import Tracker

    tracker = Tracker(cfg.run.root, cfg.run.experiment)
    try:
        comp = collect(tracker, grid_run_id=grid_run_id, run_ids=run_ids)
    except NothingToCompare as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    try:
        paths = write_report(comp, out)
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if claims:
        from flows.results import write_results

        paths["results"] = write_results(comp, paths["html"].parent, tracking_uri=tracker.uri)
        typer.echo(f"results and verdicts: {paths['results']}")
    logged_to = log_report(tracker, comp, paths)
    typer.echo(f"report: {paths['html']} (and report.md, {len(paths) - 2} plots); logged to MLflow run {logged_to}")


@app.command()
def compare(
    args: list[str] | None = typer.Argument(None, metavar="[RUN_ID]... [KEY=VALUE]...",
                                               help="Pipeline runs to compare (default: the latest grid), and "
                                                    "overrides such as run.root=./runs"),
    grid_run: str | None = typer.Option(None, "--grid", help="Compare the variants of this grid run."),
    out: Path = typer.Option(Path("compare-report"), "--out", help="Folder for report.html, report.md, plots/."),
    preset: str = typer.Option("fmnist", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file (for run.root / run.experiment)."),
    overrides: list[str] = typer.Option([], "--set", hidden=True, help="Old spelling of a KEY=VALUE argument."),
    claims: bool = typer.Option(False, "--claims", help="Also write results.md: the paper's claims judged on the "
                                "runs (experiments/claims.yaml), mean and spread over seeds, plots with error bars."),
) -> None:
    """Write a comparison report (table + plots vs keep_ratio) of a grid or of runs; log it to MLflow."""
    run_ids = [a for a in args or [] if "=" not in a]
    overrides = [*overrides, *(a for a in args or [] if "=" in a)]
    if run_ids and grid_run:
        typer.secho("error: pass run ids or --grid, not both", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _compare(_resolve_or_exit(preset, config, overrides), grid_run, run_ids, out, claims)


@app.command()
def status(
    overrides: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]..."),
    preset: str = typer.Option("fmnist", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config values."),
) -> None:
    """A table of the pipeline's stages for a config: done or not, key, artifact path, MLflow run."""
    from rich.console import Console
    from rich.table import Table

    from flows.pipeline import stage_status

    cfg = _resolve_or_exit(preset, config, overrides or [])
    table = Table(title=f"mqgen status: preset {cfg.preset}, config {cfg.hash()}, root {cfg.run.root}")
    for col in ("stage", "state", "key", "artifacts", "mlflow run"):
        table.add_column(col)
    colours = {"done": "green", "skipped": "cyan", "damaged": "red", "not done": "yellow", "waiting": "dim"}
    rows = stage_status(cfg)
    for row in rows:
        table.add_row(row["stage"], f"[{colours[row['state']]}]{row['state']}[/]", row["key"], row["path"],
                      row["run_id"])
    Console().print(table)
    for row in rows:  # in full: a narrow table cuts the reason short
        if row["state"] == "damaged":
            typer.secho(f"damaged: {row['stage']}: {row['path']}", fg=typer.colors.RED)
        elif row["why"] and row["state"] == "done":
            typer.secho(f"{row['stage']} is done; {row['why']}", fg=typer.colors.YELLOW)
        elif row["why"]:
            typer.secho(redact_text(f"why {row['stage']} is not done (key {row['key'] or '?'}): {row['why']}"),
                        fg=typer.colors.YELLOW)
    typer.echo("A stage that is 'not done' resumes from its checkpoints / done keys on the next `mqgen run`; a "
               "'damaged' output is moved aside (kept as .<key>.damaged-<time>) and built again.")


@app.command()
def serve(
    overrides: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]..."),
    cron: str = typer.Option(..., "--cron", help="Cron expression (minute hour day month weekday), "
                                                 "e.g. '0 3 * * *' = every day at 03:00."),
    preset: str = typer.Option("fmnist", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config values."),
    name: str | None = typer.Option(None, "--name", help="Deployment name (default mqgen-<preset>-<hash>)."),
    timezone: str | None = typer.Option(None, "--timezone", help="IANA timezone of the cron (default UTC)."),
    from_stage: str | None = typer.Option(None, "--from", help=f"Force a rerun from this stage on every "
                                             f"scheduled run (default: reuse every unchanged stage). {STAGE_HELP}"),
    port: int = typer.Option(4200, "--port", help="Port of the local Prefect server started when "
                                                  "PREFECT_API_URL is not set (another free one if taken)."),
    gc_keep_days: float | None = typer.Option(None, "--gc-keep-days", min=0.0,
                                              help="After each scheduled run, reclaim disk on the root like `mqgen gc --yes "
                                                   "--keep-days N` (never this config's outputs)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Serve the pipeline on a cron schedule (scheduled retraining); blocks until Ctrl-C / SIGTERM.

    Each scheduled run reuses every unchanged stage (stages cache by key). Without PREFECT_API_URL, a local
    `prefect server start` (database under <run.root>/.prefect) runs for as long as this command."""
    from contextlib import nullcontext

    cfg = _resolve_or_exit(preset, config, overrides or [])
    if from_stage is not None and from_stage not in STAGES:
        typer.secho(f"error: --from {from_stage!r} is not a stage; allowed: {', '.join(STAGES)}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _prepare_environment(cfg)  # Prefect reads its settings once: every variable is set before it is imported
    _start_logging(cfg, "serve", verbose)
    from flows import serve as serving

    api_url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    own_server = not api_url
    if own_server:
        api_url = f"http://127.0.0.1:{serving.free_port(port)}/api"
        os.environ["PREFECT_API_URL"] = api_url
    try:
        serving.cron_schedule(cron, timezone)
    except serving.ScheduleError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if not own_server and not serving.reachable(api_url):
        typer.secho(f"error: no Prefect API answers at PREFECT_API_URL={api_url}: start it (`prefect server "
                    "start`) or unset PREFECT_API_URL to let mqgen serve run a local server",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    deployment = f"{serving.FLOW_NAME}/{name or serving.deployment_name(cfg)}"
    home = Path(os.environ["PREFECT_HOME"]) if os.environ.get("PREFECT_HOME") else Path.home() / ".prefect"
    with serving.sigterm_exits():
        try:
            server = serving.local_server(api_url, home) if own_server else nullcontext()
            if own_server:
                typer.echo(f"starting a local Prefect server on {api_url} (log: {home / 'server.log'}) ...")
            with server:
                ui = serving.ui_url()
                typer.echo(
                    f"serving {deployment!r} on cron {cron!r} ({timezone or 'UTC'}), preset {cfg.preset}, config "
                    f"{cfg.hash()}, run root {cfg.run.root}\n"
                    f"  Prefect API: {api_url}" + (" (local server, stops with this command)" if own_server else "")
                    + (f"\n  UI: {ui}/deployments" if ui else "")
                    + f"\n  PREFECT_API_URL={api_url} prefect deployment ls"
                    f"\n  PREFECT_API_URL={api_url} prefect deployment run {deployment!r}   # one run now"
                    "\nEach run reuses every unchanged stage. Ctrl-C or SIGTERM stops serving (the schedule is "
                    "paused until served again).")
                sys.stdout.flush()
                serving.serve_pipeline(cfg, cron, timezone=timezone, name=name, from_stage=from_stage,
                                       gc_keep_days=gc_keep_days)
        except serving.ServerError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
    typer.echo(f"stopped serving {deployment!r}")


MODEL_HELP = ("Model: an alias such as champion, a version (v3), models:/NAME@ALIAS, models:/NAME/VERSION, or an "
              "exported folder; default: the finished model of this preset/config.")


def _model_source(cfg: PipelineConfig, model: str | None) -> Any:
    """A context manager yielding ``(bundle, registered version or None, evaluation dict or None)`` for ``model``
    (see :data:`MODEL_HELP`); exits 1 with one clear line when it cannot be found or does not verify."""
    import contextlib

    from infra import registry
    from infra.bundle import Bundle, BundleError

    @contextlib.contextmanager
    def source() -> Any:
        try:
            if model is not None:
                with registry.load_bundle(model, cfg) as (bundle, version):
                    evaluation = None
                    if version is not None:
                        from infra.tracking import Tracker

                        evaluation = registry.evaluation_of(Tracker(cfg.run.root, cfg.run.experiment), version)
                    elif (bundle.path / "evaluation.json").is_file():
                        evaluation = json.loads((bundle.path / "evaluation.json").read_text())
                    yield bundle, version, evaluation
                return
            from flows.stages import cached_refs

            refs = cached_refs(cfg)
            gen, tok = refs.get("train_stackformer"), refs.get("train_tokenizer")
            if gen is None or tok is None:
                raise registry.ModelNotFound(
                    f"config {cfg.hash()} (preset {cfg.preset}) has no finished Stackformer under {cfg.run.root}: "
                    "run `mqgen run` first, or pass --model champion / a folder")
            ev = refs.get("evaluate")
            evaluation = json.loads(Path(ev.evaluation_json).read_text()) if ev is not None else None
            # the stage outputs as they are (their loaders verify the weights): no copy
            index = {"name": cfg.registry.model_name("stackformer", cfg.preset), "data": _data_facts(cfg, refs),
                     "provenance": {"config_hash": cfg.hash(), "preset": cfg.preset,
                                    "mlflow_run_id": gen.mlflow_run_id, "tokenizer_sha256": tok.sha256,
                                    "generator_sha256": gen.sha256}}
            yield Bundle(path=Path(gen.path), kind="generator", tokenizer=tok, generator=gen, index=index), None, \
                evaluation
        except (registry.ModelNotFound, registry.ArtifactAltered, BundleError) as e:
            typer.secho(redact_text(f"error: {e}"), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return source()


def _data_facts(cfg: PipelineConfig, refs: dict[str, Any]) -> dict[str, Any]:
    ing = refs.get("ingest")
    facts: dict[str, Any] = {"source": cfg.data.source}
    if ing is not None:
        from infra.shards import ShardSet

        facts.update(image_size=ing.image_size, channels=ing.channels, num_classes=ing.num_classes,
                     classes=ShardSet.from_output(ing).classes)
    return facts


@app.command()
def sample(
    overrides: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]...",
                                                    help="Overrides, e.g. run.root=./runs evaluate.sampling.top_k=50"),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    n: int = typer.Option(64, "--n", min=1, max=10_000, help="Number of images."),
    label: int | None = typer.Option(None, "--class", help="Class index for a class-conditional model "
                                                              "(default: classes in turn)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Caption for a text-conditional model, e.g. "
                                                               "\"a small red circle above a large blue square\"."),
    guidance: float | None = typer.Option(None, "--guidance", min=0.0, help="Classifier-free guidance scale "
                                             "(default: the config's evaluate.sampling.guidance_scale; 1 = none)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed, same images)."),
    out: Path = typer.Option(Path("samples.png"), "--out", help="PNG grid to write (.png), or .safetensors for the "
                                                                "uint8 images and labels."),
    preset: str = typer.Option("fmnist", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config values."),
) -> None:
    """Sample images from a trained model: the registry's champion, a version, an exported folder, or the
    finished model of a config. Sampling settings are the config's evaluate.sampling."""
    import torch

    from infra.refs import load_generator, load_tokenizer
    from infra.storage import atomic_write_bytes, save_tensors
    from infra.viz import grid, png_bytes
    from tasks.evaluate import sample_batch

    if out.suffix.lower() not in (".png", ".safetensors"):
        typer.secho(f"error: --out {out}: give a .png or .safetensors file", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    extra = [] if guidance is None else [f"evaluate.sampling.guidance_scale={guidance}"]
    cfg = _resolve_or_exit(preset, config, [*(overrides or []), *extra])
    with _model_source(cfg, model) as (bundle, version, _):
        c = bundle.num_classes
        if bundle.generator is None:
            typer.secho(f"error: {model} is a tokenizer, not a generator", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        text = _prompt_ids(bundle.generator, prompt, n)
        if label is not None and not 0 <= label < max(c, 1) or (label is not None and c == 0):
            typer.secho(f"error: --class {label}: the model has {c} classes" + (" (it is unconditional)" if not c
                        else f" (0..{c - 1})"), fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer, generator = load_tokenizer(bundle.tokenizer, device), load_generator(bundle.generator, device)
        labels = (torch.full((n,), label, dtype=torch.long) if label is not None
                  else (torch.arange(n) % c if c else None))
        images, batch = [], cfg.evaluate.batch_size
        for b, begin in enumerate(range(0, n, batch)):
            m = min(batch, n - begin)
            g = torch.Generator(device=device).manual_seed(seed + b)
            try:
                images.append(sample_batch(generator, tokenizer, m,
                                           None if labels is None else labels[begin:begin + m], cfg, g, device,
                                           None if text is None else text[begin:begin + m]).images)
            except ConfigError as e:
                typer.secho(f"config error: {e}", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None
        imgs = torch.cat(images)
        what = f"{version.name} v{version.version}" if version else str(bundle.path if model else "config " + cfg.hash())
        if out.suffix.lower() == ".png":
            nrow = c if label is None and 0 < c <= 16 else 8
            atomic_write_bytes(out, png_bytes(grid(imgs, nrow=min(nrow, n), scale=max(1, 64 // imgs.shape[-1]))))
        else:
            save_tensors(out, {"images": imgs, "labels": labels if labels is not None else torch.full((n,), -1)},
                         {"model": what, "seed": str(seed)})
    classes = bundle.classes
    which = (f", class {label}" + (f" ({classes[label]})" if label is not None and label < len(classes) else "")
             if label is not None else "")
    if prompt is not None:
        which = f", prompt {prompt!r}, guidance {cfg.evaluate.sampling.guidance_scale:g}"
    typer.echo(f"wrote {n} samples of {what}{which} (seed {seed}) to {out}")


def _prompt_ids(generator: Any, prompt: str | None, n: int) -> Any:
    """``[n, text_len]`` caption ids of ``prompt`` for a text-conditional generator (None for another model);
    exits 2 with one line when the prompt and the model do not go together."""

    from infra.refs import caption_tokenizer
    from infra.text import TextTokenizerError

    if not generator.text_len:
        if prompt is not None:
            typer.secho("error: --prompt: this model is not text-conditional (train it on captioned data, e.g. "
                        "--preset shapes-text)", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        return None
    if prompt is None:
        typer.secho("error: this model is text-conditional: give --prompt \"a caption\"", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        tok = caption_tokenizer(generator)
    except TextTokenizerError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    ids, cut = tok.prompt_ids(prompt, generator.text_len, n)
    if cut:
        typer.secho(f"warning: the prompt is longer than the model's {generator.text_len} caption tokens; its end is "
                    "ignored", fg=typer.colors.YELLOW, err=True)
    return ids


@app.command()
def export(
    out: Path = typer.Argument(..., help="New (or empty) folder to write the model into."),
    overrides: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]..."),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    preset: str = typer.Option("fmnist", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config values."),
) -> None:
    """Write a self-contained model folder (Hugging Face Hub layout: model_index.json, README.md model card with
    the evaluation and its provenance, configs and safetensors) that `mqgen sample --model DIR` loads."""
    from infra.bundle import write_bundle

    cfg = _resolve_or_exit(preset, config, overrides or [])
    with _model_source(cfg, model) as (bundle, version, evaluation):
        provenance = dict(bundle.index.get("provenance") or {})
        if version is not None:
            provenance.update(registered_model=version.name, version=version.version,
                              promotion=version.tags.get("mqgen.promotion", ""))
        if evaluation is not None:
            provenance["evaluation"] = {k: evaluation.get(k) for k in ("stage_key", "extractor", "extractor_info", "n",
                                                                          "seeds", "fid_interval",
                                                                          "reference_statistics")}
            provenance["evaluation"]["reference_set_hash"] = (evaluation.get("data") or {}).get("reference_set_hash")
        try:
            write_bundle(out, tokenizer=bundle.tokenizer, generator=bundle.generator, data=bundle.index.get("data"),
                         provenance=provenance, evaluation=evaluation, name=bundle.index.get("name", ""))
        except FileExistsError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
    typer.echo(f"exported {bundle.index.get('name') or 'the model'}" + (f" v{version.version}" if version else "")
               + f" to {out} (sample with: mqgen sample --model {out})")


def _run_start(client: Any, run_id: str) -> int:
    """When the MLflow run started (ms since the epoch); 0 for a run that is gone."""
    try:
        return int(client.get_run(run_id).info.start_time or 0)
    except Exception:  # noqa: BLE001 - a deleted run, or none recorded
        return 0


@app.command()
def models(
    overrides: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]..."),
    preset: str = typer.Option("fmnist", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config values."),
) -> None:
    """The registered Stackformer versions of this preset/config: aliases, FID with its interval, promotion. FIDs are
    on the evaluation protocol of the champion's latest evaluation; a version never evaluated there shows its own
    latest FID, with its protocol named (not comparable)."""
    from rich.console import Console
    from rich.table import Table

    from infra.registry import EVAL_PREFIX, TAG_DECISION
    from infra.tracking import Tracker

    cfg = _resolve_or_exit(preset, config, overrides or [])
    name = cfg.registry.model_name("stackformer", cfg.preset)
    client = Tracker(cfg.run.root, cfg.run.experiment).client
    try:
        versions = client.search_model_versions(f"name = '{name}'")
        aliases = client.get_registered_model(name).aliases
    except Exception:  # noqa: BLE001 - no such registered model
        typer.echo(f"no registered versions of {name} under {cfg.run.root} (a `mqgen run` registers them)")
        return
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(alias)

    def evaluations(tags: dict[str, str]) -> list[tuple[int, str]]:
        """``(start of its evaluate run, protocol id)`` of each FID recorded in ``tags``, the latest last."""
        pids = [k[len(EVAL_PREFIX):-len(".fid")] for k in tags if k.startswith(EVAL_PREFIX) and k.endswith(".fid")]
        return sorted((_run_start(client, tags.get(f"{EVAL_PREFIX}{pid}.run_id", "")), pid) for pid in pids)

    def protocol_text(pid: str) -> str:
        """The protocol's id, extractor and sample count (its JSON is on every version evaluated on it)."""
        raw = next((mv.tags[k] for mv in versions if (k := f"{EVAL_PREFIX}{pid}.protocol") in mv.tags), "{}")
        proto = json.loads(raw)
        return f"{pid} ({proto.get('extractor') or '?'}, {proto.get('samples') or '?'} samples)"

    ordered = sorted(versions, key=lambda m: int(m.version))
    evals = {str(mv.version): evaluations(mv.tags) for mv in ordered}
    champion = str(aliases.get(cfg.registry.alias, ""))
    if evals.get(champion):
        current, whose = evals[champion][-1][1], f"the latest evaluation of v{champion} ({cfg.registry.alias})"
    else:  # no champion, or one never evaluated: the latest evaluation of any version
        latest = max((e[-1] for e in evals.values() if e), default=None)
        current, whose = (latest[1] if latest else None), "the latest evaluation"
    table = Table(title=f"{name} ({cfg.run.root})")
    for col in ("version", "aliases", "FID", "FID 95% interval", "protocol", "promotion", "run"):
        table.add_column(col)
    for mv in ordered:
        t, pids = mv.tags, [pid for _, pid in evals[str(mv.version)]]
        pid = current if current in pids else (pids[-1] if pids else None)
        p = f"{EVAL_PREFIX}{pid}."
        fid = f"{float(t[p + 'fid']):.4g}" if pid else ""
        interval = f"{float(t[p + 'low']):.4g} .. {float(t[p + 'high']):.4g}" if pid and p + "low" in t else ""
        shown = "" if pid is None else pid if pid == current else f"other: {protocol_text(pid)}, not comparable"
        table.add_row(str(mv.version), ", ".join(by_version.get(str(mv.version), [])), fid, interval, shown,
                      t.get(TAG_DECISION, "").split(":")[0], mv.run_id)
    if current is not None:
        table.caption = f"FID on evaluation protocol {protocol_text(current)}: {whose}"
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # a log keeps whole rows


@app.command()
def gc(
    overrides: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]..."),
    preset: str = typer.Option("fmnist", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config values."),
    keep_days: float = typer.Option(7.0, "--keep-days", min=0.0,
                                    help="Keep what a run of the last N days used, and anything changed since."),
    keep_last: int = typer.Option(3, "--keep-last", min=0,
                                  help="Also keep what the last N pipeline runs used, however old."),
    yes: bool = typer.Option(False, "--yes", help="Remove (without it, only show what would be removed)."),
    show_kept: bool = typer.Option(False, "--show-kept", help="Also list what is kept, with the reason."),
    drop_unfinished: bool = typer.Option(False, "--drop-unfinished",
                                         help="Also remove unfinished outputs (and their checkpoints) older than "
                                              "--keep-days: an abandoned run's resume state."),
) -> None:
    """Reclaim disk on the run root: stage outputs no recent run and not this config uses, spent Ray checkpoints,
    old logs. Shows what it would remove unless --yes. The registry's models are never touched."""
    from rich.console import Console
    from rich.table import Table

    from flows import gc as collector
    from infra.console import fmt_bytes

    cfg = _resolve_or_exit(preset, config, overrides or [])
    if not Path(cfg.run.root).is_dir():
        typer.echo(f"nothing to collect: there is no run root at {cfg.run.root} (run.root=...)")
        return
    try:
        if yes:
            items, done = collector.collect(cfg, keep_days=keep_days, keep_last=keep_last,
                                            drop_unfinished=drop_unfinished)
        else:
            items, done = collector.plan(cfg, keep_days=keep_days, keep_last=keep_last,
                                         drop_unfinished=drop_unfinished), None
    except collector.GcRefused as e:
        typer.secho(f"error: gc refused: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - one readable line; nothing is removed before the plan is complete
        typer.secho(f"error: gc failed: {type(e).__name__}: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    shown = [it for it in items if show_kept or it.removable]
    table = Table(title=f"mqgen gc: {cfg.run.root}")
    for col in ("what", "stage", "key", "size", "days", "decision"):
        table.add_column(col, no_wrap=col != "decision")
    for it in shown:
        table.add_row(it.what + (" (link)" if it.link else ""), it.stage, it.key, fmt_bytes(it.size),
                      f"{it.age_days:.1f}", "[yellow]remove[/]" if it.removable else f"[green]keep[/] ({it.keep})")
    if shown:
        Console(width=None if sys.stdout.isatty() else 140).print(table)  # a log keeps whole rows
    totals = collector.summary(items)
    typer.echo(f"{totals['removable']} removable ({fmt_bytes(totals['removable_bytes'])}), "
               f"{totals['kept']} kept ({fmt_bytes(totals['kept_bytes'])}): kept are the outputs of config "
               f"{cfg.preset} {cfg.hash()}, of the runs of the last {keep_days:g} days, of the last {keep_last} pipeline "
               "runs and of running ones, anything changed since, and unfinished stages' resume state"
               + (" (not kept: --drop-unfinished)" if drop_unfinished else ""))
    if done is None:
        if totals["removable"]:
            typer.echo("nothing removed: run again with --yes to remove them")
        return
    typer.echo(f"removed {done.count} ({fmt_bytes(done.size)} freed)")
    for it in done.in_use:
        typer.echo(f"in use, left for the next gc: {it.what} {it.stage} {it.key} ({it.path})")
    for why in done.failed:
        typer.secho(f"could not remove {why}", fg=typer.colors.YELLOW, err=True)


@config_app.command("show")
def config_show(
    overrides: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]..."),
    preset: str = typer.Option("fmnist", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config values."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Print the resolved configuration (preset + file + overrides), validated."""
    cfg = _resolve_or_exit(preset, config, overrides or [])
    d = cfg.to_dict()
    text = json.dumps(d, indent=2) if as_json else yaml.safe_dump(d, sort_keys=False)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


if __name__ == "__main__":
    app()
