"""The ``align`` commands that talk to the job service: ``submit`` (with ``--follow``), ``jobs ...`` and
``artifacts ...``, through :class:`align.client.Client`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from align.cli_output import console, fail, say
from align.progress import TERMINAL_STATES, StageProgress, epoch_seconds, fmt

jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect and cancel jobs on the service.")
artifacts_app = typer.Typer(no_args_is_help=True, help="Inspect and download artifacts from the service.")
URL_OPTION = typer.Option(None, "--url", envvar="ALIGN_URL", help="Service URL (default http://127.0.0.1:8321).")


def _client(url: str | None):
    from align.client import Client

    return Client(url)


def _service_call(call):
    """Run a client call; a refusal prints the service's per-field messages (and, for a 401, where the
    key was looked for) and exits 2."""
    import httpx

    from align.client import ServiceError

    try:
        return call()
    except ServiceError as exc:
        raise fail(str(exc), 2 if exc.status < 500 else 1) from None
    except httpx.ConnectError as exc:
        raise fail(f"cannot reach the service: {exc}; is `align serve` running?", 1) from None


def _job_table(job: dict) -> Table:
    table = Table(title=Text.assemble(f"{job['id']}  {job['name']}  ", (job["status"], "bold")))
    for column in ("stage", "type", "state", "attempt", "step", "artifact", "error"):
        table.add_column(column)
    for stage in job["stages"]:
        progress = stage.get("progress") or {}
        step = f"{progress.get('step') or 0}/{progress.get('total_steps') or '?'}"
        error = stage.get("error") or {}
        message = ": ".join(str(part) for part in (error.get("code"), error.get("message")) if part)[:80]
        table.add_row(stage["name"], stage["type"], stage["state"], f"{stage['attempt']}/{stage['max_attempts']}",
                      step, stage.get("artifact_id") or "", Text(message))
    return table



def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON; relative paths are taken from its folder.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show live progress until the job ends.")] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Resubmitting with the same key never makes a second job.")
    ] = None,
    url: str | None = URL_OPTION,
) -> None:
    """Submit a job to the service."""
    import yaml

    from align.client import read_spec

    try:
        body = read_spec(spec)
    except (OSError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise fail(f"{spec}: {exc}") from None
    with _client(url) as client:
        job = _service_call(lambda: client.submit(body, idempotency_key))
        say(f"submitted {job['id']} ({job['name']}: {' -> '.join(s['name'] for s in job['stages'])})")
        if follow:
            job = follow_job(client, job["id"])
            raise typer.Exit(0 if job["status"] == "succeeded" else 1)


def follow_job(client, job_id: str) -> dict:
    """Live progress bars (step, loss, time since the stage started, ETA) per stage from the event stream,
    with each stage's precision and any warning or error; returns the finished job."""
    from align.spec import PRECISION_SUMMARY_PREFIX

    job = client.job(job_id)
    with StageProgress(console) as bars:
        for stage in job["stages"]:
            progress = stage.get("progress") or {}
            bars.add(stage["id"], stage["name"], stage["state"], total=progress.get("total_steps"),
                     step=progress.get("step") or 0, started=epoch_seconds(stage.get("started_at")),
                     ended=epoch_seconds(stage.get("finished_at")))
        asked: set[str] = set()
        for event in client.stream_events(job_id):
            key = event.get("stage_run_id")
            if key not in bars:
                continue
            payload, name = event["payload"], bars.name(key)
            if event["type"] == "state":
                state = payload.get("to", "")
                if state == "running":  # a new attempt: its clock starts at the stage's started_at
                    stage = _stage(client, job_id, key)
                    bars.start(key, started=epoch_seconds(stage.get("started_at")) or epoch_seconds(event["time"]),
                               total=(stage.get("progress") or {}).get("total_steps"))
                bars.state(key, state, at=epoch_seconds(event["time"]))
                if state in ("failed", "cancelled") and payload.get("error_message"):
                    bars.print(f"  [{name}] {payload.get('error_code')}: {payload['error_message']}", style="red")
            elif event["type"] == "metrics":
                if bars.total(key) is None and key not in asked:  # the worker's first heartbeat carries the plan
                    asked.add(key)
                    bars.set_total(key, (_stage(client, job_id, key).get("progress") or {}).get("total_steps"))
                bars.step(key, payload)
            elif event["type"] == "message" and event.get("level") in ("warning", "error"):
                bars.print(f"  [{name}] {payload.get('text', payload)}", style="yellow")
            elif event["type"] == "message" and str(payload.get("text", "")).startswith(PRECISION_SUMMARY_PREFIX):
                bars.print(f"  [{name}] {payload['text']}", style="dim")
            elif event["type"] == "message":
                bars.note(key, str(payload.get("text", "")))
    job = client.job(job_id)
    console.print(_job_table(job))
    return job


def _stage(client, job_id: str, stage_run_id: str) -> dict:
    return next(s for s in client.job(job_id)["stages"] if s["id"] == stage_run_id)


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
    """Cancel a job: its running stage is stopped and later stages never start. A job that has already
    ended is left as it is, and the command exits 1."""
    with _client(url) as client:
        job = _service_call(lambda: client.job(job_id))
        if job["status"] in TERMINAL_STATES:
            raise fail(f"{job_id} has already ended ({job['status']}); there is nothing to cancel", 1)
        console.print(_job_table(_service_call(lambda: client.cancel(job_id))))


@jobs_app.command("events")
def jobs_events(
    job_id: str,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
    url: str | None = URL_OPTION,
) -> None:
    """A job's events: state changes, messages and metrics."""
    with _client(url) as client:
        if follow:
            events = client.stream_events(job_id)
        else:
            events = _service_call(lambda: client.events(job_id, limit=1000))["data"]
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
    table = Table(title=Text(f"{artifact['id']}  ({artifact['kind']})"), show_header=False)
    table.add_row("lineage", Text(f"{artifact['lineage']} v{artifact['version']}"))
    table.add_row("parents", Text(", ".join(artifact["parents"]) or "(base model)"))
    table.add_row("uri", Text(artifact["uri"]))
    table.add_row("manifest", artifact["manifest_hash"])
    for key, value in artifact.get("metrics", {}).items():
        table.add_row(Text(key), fmt(value))
    files = (artifact.get("manifest") or {}).get("files", {})
    listing = "\n".join(f"{name}  ({entry.get('size', '?')} B)" for name, entry in sorted(files.items()))
    table.add_row("files", Text(listing))
    console.print(table)


@artifacts_app.command("download")
def artifacts_download(
    artifact_id: str,
    dest: Annotated[Path, typer.Argument(help="Folder to write the files into.")],
    url: str | None = URL_OPTION,
) -> None:
    """Download an artifact's files (checked against its manifest)."""
    with _client(url) as client:
        folder = _service_call(lambda: client.download_artifact(artifact_id, dest))
    say(f"{artifact_id} -> {folder}")
