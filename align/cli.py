"""The ``align`` command line.

Every message that comes from the service, a spec or a data file is printed with rich markup off, so
text such as ``[a-z0-9]`` or ``[/data]`` prints as it is.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from align import paths
from align.progress import TERMINAL_STATES, StageProgress, epoch_seconds, fmt

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Preference-alignment training: SFT, reward models, DPO, PPO, GRPO and RLOO.")
console = Console(width=int(os.environ.get("COLUMNS", "140")))

STEP_KEYS = ("loss", "rewards_accuracy", "rewards_margin", "accuracy", "lr", "grad_norm", "tokens_per_s")


def say(text: str, style: str | None = None) -> None:
    """Print ``text`` as it is: no markup, no highlighting, no wrapping inside words."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def fail(text: str, code: int = 2) -> typer.Exit:
    """Print an error in red, as it is; raise the returned exit."""
    say(text, style="red")
    return typer.Exit(code)


LIBRARIES = r"(transformers|peft|torch|deepspeed|datasets|accelerate|bitsandbytes|huggingface_hub)(\.|$)"
"""Modules whose Python warnings a command does not show: what they warn about is theirs to fix, not the user's."""


def quiet_warnings() -> None:
    """Keep library warnings (transformers' FutureWarning, peft's UserWarning, ...) out of the command's
    output; a multi-worker stage's ranks write theirs to the stage's ``ranks.log``."""
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", module=LIBRARIES)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"align {version('align')}")
        except PackageNotFoundError:
            print("align (not installed as a package)")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    quiet_warnings()


def _quiet_libraries() -> None:
    """Keep library progress bars and load reports out of the training log."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _load(spec: Path):
    from align.spec import SpecError, load_spec

    try:
        return load_spec(spec)
    except SpecError as exc:
        raise fail(str(exc)) from None


def train_job(spec: Path):
    """The job ``align train`` runs: relative local data and model paths taken from the spec's folder, as
    ``align validate`` checks them and ``align submit`` sends them (:func:`align.client.read_spec`)."""
    from align.client import read_spec
    from align.spec import SpecError, parse_spec

    _load(spec)  # a missing or unreadable spec fails as validate says it
    try:
        return parse_spec(read_spec(spec), str(spec))
    except SpecError as exc:
        raise fail(str(exc)) from None


@app.command()
def train(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
    work_dir: Annotated[Path | None, typer.Option(help="Checkpoints and logs (default .align/runs/<job name>).")] = None,
    artifact_root: Annotated[str | None, typer.Option(help="Artifact store root, a path or fsspec URL.")] = None,
    fresh: Annotated[bool, typer.Option(help="Ignore checkpoints from an earlier run of this job.")] = False,
    log_every: Annotated[int, typer.Option(help="Also print every N-th logged step as a line (0: bars only).")] = 0,
) -> None:
    """Train a job's stages in order on this machine, without the service.

    Relative paths are taken from the spec's folder, as ``align validate`` and ``align submit`` take them."""
    _quiet_libraries()
    from align.runner import run_job

    job = train_job(spec)
    work = work_dir or paths.home_dir() / "runs" / job.name
    if fresh and work.exists():
        import shutil

        shutil.rmtree(work)
    root = artifact_root or paths.artifact_root()
    say(f"{job.name}: {' -> '.join(job.stage_names())} on {job.base_model}", style="bold")
    _warn_precision(job)

    from align.data.load import DataError
    from align.models.load import ModelError

    with StageProgress(console) as bars:
        for name in job.stage_names():
            bars.add(name, name, state="waiting")

        def on_metrics(stage: str, record: dict) -> None:
            step = record.get("step", 0)
            evaluation = {k: v for k, v in record.items() if k.startswith("eval_")}
            if evaluation:
                shown = "  ".join(f"{k.removeprefix('eval_')}={fmt(v)}" for k, v in evaluation.items())
                bars.print(f"  [{stage}] step {step:>5} held-out {shown}")
            elif log_every and step % log_every == 0:
                shown = "  ".join(f"{k}={fmt(record[k])}" for k in STEP_KEYS if k in record)
                bars.print(f"  [{stage}] step {step:>5}  {shown}")
            bars.step(stage, record)

        def on_message(stage: str, text: str, level: str) -> None:
            bars.print(f"  [{stage}] {text}", style="yellow" if level == "warning" else "dim")

        def on_stage_end(stage: str, result) -> None:
            bars.end(stage, "succeeded", steps=result.metrics.get("steps"))
            table = Table(title=Text(f"stage {stage}: {result.artifact.artifact_id}"), show_header=False)
            for key, value in result.metrics.items():
                table.add_row(key, fmt(value))
            table.add_row("artifact", Text(result.artifact.uri))
            bars.show(table)

        def on_stage_start(stage: str, planned_steps: int) -> None:
            bars.start(stage, total=planned_steps, started=time.time())

        try:
            results = run_job(job, work_root=work, artifact_root=root, on_metrics=on_metrics,
                              on_stage_end=on_stage_end, on_message=on_message, on_stage_start=on_stage_start)
        except (DataError, ModelError) as exc:
            raise fail(str(exc)) from None
    say("artifacts", style="bold")
    for result in results:
        say(f"  {result.artifact.artifact_id}  {result.artifact.uri}")


@app.command()
def validate(spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")]) -> None:
    """Check a job spec, its data files and a local base model, as POST /jobs does, without training.

    Relative paths are taken from the spec's folder, as ``align submit`` sends them."""
    job = _load(spec)
    problems = file_problems(job, spec.resolve().parent)
    if problems:
        lines = "\n".join(f"  {field}: {message}" for field, message in problems)
        raise fail(f"{spec}: the spec is valid, but its files are not\n{lines}")
    say(f"ok: {job.name} ({', '.join(job.stage_names())}), spec hash {job.hash()}")
    _warn_precision(job)


def file_problems(job, folder: Path) -> list[tuple[str, str]]:
    """``(field, message)`` for a local base model that is not a model folder, for each data file that
    is missing or does not fit its stage, and for a chat template that cannot mark a sample of its rows'
    assistant tokens, built-in datasets' included (:func:`align.preflight.job_problems`, as POST checks
    them); relative paths are taken from ``folder``, and remote locations are left to the worker."""
    from align.preflight import job_problems

    def local(location: str) -> str | None:
        location = location.removeprefix("file://")
        return None if ":" in location.split("/", 1)[0] else paths.beside(location, folder)

    return job_problems(job, local)


def _warn_precision(job) -> None:
    from align.preflight import precision_warning

    warning = precision_warning(job)
    if warning:
        say(f"warning: {warning}", style="yellow")


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


@app.command()
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
    table = Table(title=Text(f"{artifact['id']}  ({artifact['kind']})"), show_header=False)
    table.add_row("lineage", Text(f"{artifact['lineage']} v{artifact['version']}"))
    table.add_row("parents", Text(", ".join(artifact["parents"]) or "(base model)"))
    table.add_row("uri", Text(artifact["uri"]))
    table.add_row("manifest", artifact["manifest_hash"])
    for key, value in artifact.get("metrics", {}).items():
        table.add_row(Text(key), fmt(value))
    files = (artifact.get("manifest") or {}).get("files", {})
    table.add_row("files", Text("\n".join(f"{name}  ({entry.get('size', '?')} B)" for name, entry in sorted(files.items()))))
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


if __name__ == "__main__":
    app()
