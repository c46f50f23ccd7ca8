"""The ``align`` command line."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

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
    work_dir: Optional[Path] = typer.Option(None, help="Checkpoints and logs (default .align/runs/<job name>)."),
    artifact_root: Optional[str] = typer.Option(None, help="Artifact store root, a path or fsspec URL."),
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

    def on_metrics(stage: str, record: dict) -> None:
        step = record.get("step", 0)
        evaluation = {k: v for k, v in record.items() if k.startswith("eval_")}
        if evaluation:
            shown = "  ".join(f"{k.removeprefix('eval_')}={_fmt(v)}" for k, v in evaluation.items())
            console.print(f"  \\[{stage}] step {step:>5} [bold]held-out[/bold] {shown}", soft_wrap=True)
        elif step % log_every == 0:
            shown = "  ".join(f"{k}={_fmt(record[k])}" for k in STEP_KEYS if k in record)
            console.print(f"  \\[{stage}] step {step:>5}  {shown}", soft_wrap=True)

    def on_stage_end(stage: str, result) -> None:
        table = Table(title=f"stage {stage}: {result.artifact.artifact_id}", show_header=False)
        for key, value in result.metrics.items():
            table.add_row(key, _fmt(value))
        table.add_row("artifact", result.artifact.uri)
        console.print(table)

    from align.data.load import DataError
    from align.models.load import ModelError

    try:
        results = run_job(job, work_root=work, artifact_root=root, on_metrics=on_metrics, on_stage_end=on_stage_end)
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


@app.command("spec-docs")
def spec_docs() -> None:
    """Print the job-spec reference (Markdown)."""
    from align.spec_docs import render_markdown

    print(render_markdown())


if __name__ == "__main__":
    app()
