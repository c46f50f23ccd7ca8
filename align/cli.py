"""The ``align`` command line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from align import paths

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Preference-alignment training: SFT, RM, DPO.")
console = Console(width=int(os.environ.get("COLUMNS", 140)))

STEP_KEYS = ("loss", "rewards_accuracy", "rewards_margin", "accuracy", "lr", "grad_norm", "tokens_per_s")


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _quiet_libraries() -> None:
    """Keep library progress bars and load reports out of the training log."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


@app.command()
def train(
    spec: Path = typer.Argument(..., help="Job spec, YAML or JSON."),
    work_dir: Path | None = typer.Option(None, help="Checkpoints and logs (default .align/runs/<job name>)."),
    artifact_root: str | None = typer.Option(None, help="Artifact store root, a path or fsspec URL."),
    fresh: bool = typer.Option(False, help="Ignore checkpoints from an earlier run of this job."),
    log_every: int = typer.Option(10, help="Print every N-th logged step."),
) -> None:
    """Train a job's stages in order on this machine, without the service."""
    _quiet_libraries()
    from align.runner import run_job
    from align.spec import SpecError, load_spec

    try:
        job = load_spec(spec)
    except SpecError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    work = work_dir or paths.home_dir() / "runs" / job.name
    if fresh and work.exists():
        import shutil

        shutil.rmtree(work)
    root = artifact_root or paths.artifact_root()
    console.print(f"[bold]{job.name}[/bold]: {' -> '.join(job.stage_names())} on {job.base_model}")
    _warn_precision(job)

    def on_metrics(stage: str, record: dict) -> None:
        step = record.get("step", 0)
        evaluation = {k: v for k, v in record.items() if k.startswith("eval_")}
        if evaluation:
            shown = "  ".join(f"{k.removeprefix('eval_')}={_fmt(v)}" for k, v in evaluation.items())
            console.print(f"  \\[{stage}] step {step:>5} [bold]held-out[/bold] {shown}", soft_wrap=True)
        elif step % log_every == 0:
            shown = "  ".join(f"{k}={_fmt(record[k])}" for k in STEP_KEYS if k in record)
            console.print(f"  \\[{stage}] step {step:>5}  {shown}", soft_wrap=True)

    def on_message(stage: str, text: str, level: str) -> None:
        style = "yellow" if level == "warning" else "dim"
        console.print(f"  [{stage}] {text}", style=style, markup=False, soft_wrap=True)

    def on_stage_end(stage: str, result) -> None:
        table = Table(title=f"stage {stage}: {result.artifact.artifact_id}", show_header=False)
        for key, value in result.metrics.items():
            table.add_row(key, _fmt(value))
        table.add_row("artifact", result.artifact.uri)
        console.print(table)

    from align.data.load import DataError
    from align.models.load import ModelError

    try:
        results = run_job(job, work_root=work, artifact_root=root, on_metrics=on_metrics, on_stage_end=on_stage_end,
                          on_message=on_message)
    except (DataError, ModelError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    console.print("[bold]artifacts[/bold]")
    for result in results:
        console.print(f"  {result.artifact.artifact_id}  {result.artifact.uri}")


@app.command()
def validate(spec: Path = typer.Argument(..., help="Job spec, YAML or JSON.")) -> None:
    """Check a job spec without training."""
    from align.spec import SpecError, load_spec

    try:
        job = load_spec(spec)
    except SpecError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    console.print(f"ok: {job.name} ({', '.join(job.stage_names())}), spec hash {job.hash()}")
    _warn_precision(job)


def _warn_precision(job) -> None:
    from align.preflight import precision_warning

    warning = precision_warning(job)
    if warning:
        console.print(f"warning: {warning}", style="yellow", markup=False, soft_wrap=True)


@app.command("spec-docs")
def spec_docs() -> None:
    """Print the job-spec reference (Markdown)."""
    from align.spec_docs import render_markdown

    print(render_markdown())


# --- the service's client side: submit, jobs, artifacts --------------------------------------------

jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect and cancel jobs on the service.")
artifacts_app = typer.Typer(no_args_is_help=True, help="Inspect and download artifacts from the service.")
app.add_typer(jobs_app, name="jobs")
app.add_typer(artifacts_app, name="artifacts")
URL_OPTION = typer.Option(None, "--url", envvar="ALIGN_URL", help="Service URL (default http://127.0.0.1:8321).")


def _client(url: str | None):
    from align.client import Client

    return Client(url)


def _service_call(call):
    """Run a client call; a refusal prints the service's per-field messages and exits 2."""
    import httpx

    from align.client import ServiceError

    try:
        return call()
    except ServiceError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2 if exc.status < 500 else 1)
    except httpx.ConnectError as exc:
        console.print(f"[red]cannot reach the service: {exc}; is `align serve` running?[/red]")
        raise typer.Exit(1)


def _job_table(job: dict) -> Table:
    table = Table(title=f"{job['id']}  {job['name']}  [bold]{job['status']}[/bold]")
    for column in ("stage", "type", "state", "attempt", "step", "artifact", "error"):
        table.add_column(column)
    for stage in job["stages"]:
        progress = stage.get("progress") or {}
        step = f"{progress.get('step') or 0}/{progress.get('total_steps') or '?'}"
        error = stage.get("error") or {}
        message = (f"{error.get('code')}: {error.get('message')}" if error else "")[:80]
        table.add_row(stage["name"], stage["type"], stage["state"], f"{stage['attempt']}/{stage['max_attempts']}",
                      step, stage.get("artifact_id") or "", message)
    return table


@app.command()
def submit(
    spec: Path = typer.Argument(..., help="Job spec, YAML or JSON; relative data paths are taken from its folder."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Show live progress until the job ends."),
    idempotency_key: str | None = typer.Option(None, help="Resubmitting with the same key never makes a second job."),
    url: str | None = URL_OPTION,
) -> None:
    """Submit a job to the service."""
    from align.client import read_spec

    with _client(url) as client:
        job = _service_call(lambda: client.submit(read_spec(spec), idempotency_key))
        console.print(f"submitted [bold]{job['id']}[/bold] ({job['name']}: {' -> '.join(s['name'] for s in job['stages'])})")
        if follow:
            job = follow_job(client, job["id"])
            raise typer.Exit(0 if job["status"] == "succeeded" else 1)


def follow_job(client, job_id: str) -> dict:
    """Live progress bars (step, loss, ETA) per stage from the event stream, with each stage's precision and
    any warning or error; returns the finished job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from align.spec import PRECISION_SUMMARY_PREFIX

    job = client.job(job_id)
    columns = (TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.fields[steps]:>11}"),
               TextColumn("{task.fields[state]:<10} {task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        asked: set[int] = set()
        bars = {s["id"]: progress.add_task(s["name"], total=None, state=s["state"], info="", steps="") for s in job["stages"]}
        for event in client.stream_events(job_id):
            bar = bars.get(event.get("stage_run_id"))
            if bar is None:
                continue
            payload = event["payload"]
            if event["type"] == "state":
                progress.update(bar, state=payload.get("to", ""))
                if payload.get("to") in ("failed", "cancelled") and payload.get("error_message"):
                    progress.console.print(f"[red]{payload.get('error_code')}: {payload['error_message']}[/red]")
            elif event["type"] == "metrics":
                total = progress.tasks[bar].total
                if total is None and bar not in asked:  # the worker's first heartbeat carries the plan
                    asked.add(bar)
                    total = _total_steps(client, job_id, event["stage_run_id"])
                if total:
                    progress.update(bar, total=total)
                if "step" in payload:
                    progress.update(bar, completed=payload["step"], steps=f"{payload['step']}/{total or '?'}")
                shown = {k: payload[k] for k in ("loss", "eval_loss", "eval_exact_match", "eval_rewards_accuracy")
                         if k in payload}
                if shown:
                    progress.update(bar, info="  ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
            elif event["type"] == "message" and event.get("level") in ("warning", "error"):
                progress.console.print(f"[yellow]{payload.get('text', payload)}[/yellow]")
            elif event["type"] == "message" and str(payload.get("text", "")).startswith(PRECISION_SUMMARY_PREFIX):
                name = progress.tasks[bar].description
                progress.console.print(f"  [{name}] {payload['text']}", style="dim", markup=False, soft_wrap=True)
    job = client.job(job_id)
    console.print(_job_table(job))
    return job


def _total_steps(client, job_id: str, stage_run_id: str) -> int | None:
    stage = next(s for s in client.job(job_id)["stages"] if s["id"] == stage_run_id)
    return (stage.get("progress") or {}).get("total_steps")


@jobs_app.command("list")
def jobs_list(
    state: str | None = typer.Option(None, help="queued, running, succeeded, failed or cancelled."),
    limit: int = typer.Option(20, help="Jobs per page."),
    url: str | None = URL_OPTION,
) -> None:
    """Newest jobs first."""
    with _client(url) as client:
        page = _service_call(lambda: client.jobs(state=state, limit=limit))
    table = Table()
    for column in ("id", "name", "status", "stages", "created"):
        table.add_column(column)
    for job in page["data"]:
        stages = " ".join(f"{s['name']}:{s['state']}" for s in job["stages"])
        table.add_row(job["id"], job["name"], job["status"], stages, job["created_at"][:19])
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, url: str | None = URL_OPTION) -> None:
    """A job and its stages."""
    with _client(url) as client:
        console.print(_job_table(_service_call(lambda: client.job(job_id))))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: str | None = URL_OPTION) -> None:
    """Cancel a job: its running stage is stopped and later stages never start."""
    with _client(url) as client:
        console.print(_job_table(_service_call(lambda: client.cancel(job_id))))


@jobs_app.command("events")
def jobs_events(
    job_id: str,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
    url: str | None = URL_OPTION,
) -> None:
    """A job's events: state changes, messages and metrics."""
    with _client(url) as client:
        events = client.stream_events(job_id) if follow else _service_call(lambda: client.events(job_id, limit=1000))["data"]
        for event in events:
            console.print(f"{event['time'][:19]}  {event['type']:<8} {event.get('stage_run_id') or '':<28} "
                          f"{json.dumps(event['payload'])}", soft_wrap=True, markup=False)


@artifacts_app.command("show")
def artifacts_show(artifact_id: str, url: str | None = URL_OPTION) -> None:
    """An artifact: lineage, parents, metrics and files."""
    with _client(url) as client:
        artifact = _service_call(lambda: client.artifact(artifact_id))
    print_artifact(artifact)


def print_artifact(artifact: dict) -> None:
    table = Table(title=f"{artifact['id']}  ({artifact['kind']})", show_header=False)
    table.add_row("lineage", f"{artifact['lineage']} v{artifact['version']}")
    table.add_row("parents", ", ".join(artifact["parents"]) or "(base model)")
    table.add_row("uri", artifact["uri"])
    table.add_row("manifest", artifact["manifest_hash"])
    for key, value in artifact.get("metrics", {}).items():
        table.add_row(key, _fmt(value))
    files = (artifact.get("manifest") or {}).get("files", {})
    table.add_row("files", "\n".join(f"{name}  ({entry.get('size', '?')} B)" for name, entry in sorted(files.items())))
    console.print(table)


@artifacts_app.command("download")
def artifacts_download(
    artifact_id: str,
    dest: Path = typer.Argument(..., help="Folder to write the files into."),
    url: str | None = URL_OPTION,
) -> None:
    """Download an artifact's files (checked against its manifest)."""
    with _client(url) as client:
        folder = _service_call(lambda: client.download_artifact(artifact_id, dest))
    console.print(f"{artifact_id} -> {folder}")


if __name__ == "__main__":
    app()
