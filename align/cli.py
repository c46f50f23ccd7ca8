"""The ``align`` command line: the training commands (``train``, ``validate``, ``spec-docs``) here, the
service's client commands (``submit``, ``jobs``, ``artifacts``) from :mod:`align.cli_service`, and
``export`` from :mod:`align.cli_export`.

Output goes through :mod:`align.cli_output`: messages from the service, a spec or a data file print as
they are, with rich markup off.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from align import paths
from align.cli_export import export
from align.cli_output import console, fail, quiet_warnings, say
from align.cli_service import artifacts_app, jobs_app, submit
from align.progress import StageProgress, fmt

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Preference-alignment training: SFT, reward models, DPO, PPO, GRPO and RLOO.")

STEP_KEYS = ("loss", "rewards_accuracy", "rewards_margin", "accuracy", "lr", "grad_norm", "tokens_per_s")


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
    work_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints and logs (default .align/runs/<job name>).")
    ] = None,
    artifact_root: Annotated[str | None, typer.Option(help="Artifact store root, a path or fsspec URL.")] = None,
    fresh: Annotated[bool, typer.Option(help="Ignore checkpoints from an earlier run of this job.")] = False,
    log_every: Annotated[int, typer.Option(help="Also print every N-th logged step as a line (0: bars only).")] = 0,
) -> None:
    """Train a job's stages in order on this machine, without the service.

    Relative paths are taken from the spec's folder, as ``align validate`` and ``align submit`` take them."""
    _quiet_libraries()
    from align.gates import GateFailed
    from align.runner import run_job

    job = train_job(spec)
    from align.tracking import MLFLOW_TRACKING_URI_ENV, tracking_problems

    for field, message in tracking_problems(job, os.environ.get(MLFLOW_TRACKING_URI_ENV)):
        raise fail(f"{spec}: {field}: {message}")
    work = work_dir or paths.home_dir() / "runs" / job.name
    if fresh and work.exists():
        import shutil

        shutil.rmtree(work)
    root = artifact_root or paths.artifact_root()
    say(f"{job.name}: {' -> '.join(job.stage_names())} on {job.base_model}", style="bold")
    _warn_precision(job)

    from align.data.load import DataError
    from align.lineage import MissingInput
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
        except (DataError, ModelError, MissingInput) as exc:
            raise fail(str(exc)) from None
        except GateFailed as exc:
            for result in exc.results:
                say(f"  {result.artifact.artifact_id}  {result.artifact.uri}")
            raise fail(f"{exc}; the stages after {exc.stage} did not run") from None
    say("artifacts", style="bold")
    for result in results:
        say(f"  {result.artifact.artifact_id}  {result.artifact.uri}")


@app.command()
def validate(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
    artifact_root: Annotated[
        str | None, typer.Option(help="Artifact store a base_model: artifact:<id> is looked up in.")
    ] = None,
) -> None:
    """Check a job spec, its data files and a local base model, as POST /jobs does, without training.

    Relative paths are taken from the spec's folder, as ``align submit`` sends them; a ``base_model:
    artifact:<id>`` must be a policy in the local artifact store, as ``align train`` reads it."""
    from align.lineage import start_artifact_check
    from align.models.weights import artifact_weights_problem
    from align.runner import store_finder

    job = _load(spec)
    problems = file_problems(job, spec.resolve().parent)
    root = artifact_root or paths.artifact_root()
    start_problem = start_artifact_check(job, store_finder(root))
    if start_problem is None and job.base_model.startswith("artifact:"):
        weights = artifact_weights_problem(root, job.base_model)
        start_problem = weights and f"'{job.base_model}' {weights}"
    if start_problem is not None:
        problems.insert(0, ("base_model", start_problem))
    if problems:
        lines = "\n".join(f"  {field}: {message}" for field, message in problems)
        raise fail(f"{spec}: the spec is valid, but its files are not\n{lines}")
    say(f"ok: {job.name} ({', '.join(job.stage_names())}), spec hash {job.hash()}")
    _warn_precision(job)


def file_problems(job, folder: Path) -> list[tuple[str, str]]:
    """``(field, message)`` for a ``report_to: [mlflow]`` without ``ALIGN_MLFLOW_TRACKING_URI`` here, a local
    base model that is not a model folder, each data file that is missing or does not fit its stage, and a
    chat template that cannot mark a sample of its rows' assistant tokens, built-in datasets' included
    (:func:`align.preflight.job_problems`, as POST checks them); relative paths are taken from ``folder``, and
    remote locations are left to the worker."""
    from align.preflight import job_problems
    from align.tracking import MLFLOW_TRACKING_URI_ENV, tracking_problems

    def local(location: str) -> str | None:
        location = location.removeprefix("file://")
        return None if ":" in location.split("/", 1)[0] else paths.beside(location, folder)

    return tracking_problems(job, os.environ.get(MLFLOW_TRACKING_URI_ENV)) + job_problems(job, local)


def _warn_precision(job) -> None:
    from align.preflight import precision_warning

    warning = precision_warning(job)
    if warning:
        say(f"warning: {warning}", style="yellow")


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
    model_config: Annotated[
        Path | None, typer.Option(help="The base model's config.json, or a folder holding one (needed for "
                                       "base_model: artifact:<id>; default: the spec's base model).")
    ] = None,
    gpu: Annotated[
        str | None, typer.Option(help="Plan for h200, h100, a100 or cpu (this machine). Default: h100 when the "
                                      "spec asks for GPUs, else cpu.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the plans as JSON.")] = False,
) -> None:
    """Estimate each stage's peak memory per rank and its step time, and whether it fits the resources the
    spec asks for, before training. Reads the base model's config.json only, never its weights."""
    from align.plan import plan_job
    from align.plan_memory import PlanError
    from align.plan_report import as_json, assumptions, device_for, load_model_config, model_line, table

    job = train_job(spec)
    try:
        config = load_model_config(job.base_model, model_config)
        device = device_for(job, gpu)
        plans = plan_job(job, config, device)
    except PlanError as exc:
        raise fail(f"{spec}: {exc}") from None
    if json_output:
        print(as_json(job, config, device, plans))
        return
    say(f"{job.name}: {' -> '.join(job.stage_names())} on {job.base_model}", style="bold")
    say(model_line(config))
    say(f"{job.resources.num_workers} rank(s), ZeRO-{job.deepspeed.zero_stage}, adapter {job.adapter.type}"
        + (f" r={job.adapter.r}" if job.adapter.type in ("lora", "dora") else "")
        + (f", {job.quantization.bits}-bit base" if job.quantization else "")
        + (", gradient checkpointing" if job.deepspeed.gradient_checkpointing else ""))
    console.print(table(plans))
    shared = [note for note in plans[0].notes if all(note in stage_plan.notes for stage_plan in plans)]
    for note in shared:
        say(f"  {note}")
    for stage_plan in plans:
        for note in stage_plan.notes:
            if note not in shared:
                say(f"  {stage_plan.name}: {note}")
    for line in assumptions(device, plans):
        say(f"  {line}", style="dim")
    if any(stage_plan.fits is False for stage_plan in plans):
        from align.plan_fit import fit_problems

        for field, message in fit_problems(job, config, device):
            say(f"{field}: {message}", style="red")
        raise typer.Exit(1)


@app.command("spec-docs")
def spec_docs() -> None:
    """Print the job-spec reference (Markdown)."""
    from align.spec_docs import render_markdown

    print(render_markdown())


app.command()(submit)
app.add_typer(jobs_app, name="jobs")
app.add_typer(artifacts_app, name="artifacts")
app.command("export")(export)


if __name__ == "__main__":
    app()
