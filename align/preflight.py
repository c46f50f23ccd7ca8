"""Checks a job before any training: the base model exists and every stage's data loads and fits its stage.

A bad file in the last stage fails the job before the first stage spends any compute.
"""

from __future__ import annotations

from align.data import load
from align.spec import JobSpec

DATA_KIND = {"sft": "sft", "rm": "preference", "dpo": "preference", "ppo": "prompt", "grpo": "prompt", "rloo": "prompt"}


def check_job(job: JobSpec, *, check_model: bool = True) -> None:
    """Raise :class:`DataError` or :class:`ModelError` naming the stage's file, row and column."""
    if check_model and not job.base_model.startswith(("builtin:", "artifact:")):
        from align.models.load import resolve_base_model

        resolve_base_model(job.base_model)
    for stage in job.stages:
        check_stage_data(stage)


def precision_warning(job: JobSpec) -> str | None:
    """The warning for an explicit bf16 on CPU workers when this machine's CPU only emulates bf16.

    Checked on the machine that runs the pre-flight (the workers of a local run); a stage also warns from
    the worker it runs on."""
    if job.deepspeed.precision != "bf16" or job.resources.gpus_per_worker > 0:
        return None
    from align.precision import resolve

    return resolve("bf16", "cpu").warning


def check_stage_data(stage) -> dict[str, int]:
    """Load and check one stage's data files; returns the row count of each (``path``, ``eval_path``)."""
    from align.stages.common import resolve_data_path

    kind = DATA_KIND[stage.type]
    counts = {}
    for field, location in (("path", stage.data.path), ("eval_path", stage.data.eval_path)):
        if location:
            path = str(resolve_data_path(location))
            rows = load.load_rows(path)
            load.validate_rows(rows, load.detect_format(rows, kind, path), path, kind=kind)
            counts[field] = len(rows)
    return counts
