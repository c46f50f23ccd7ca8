"""Whether a submitted job's stages fit the memory of the workers that will run them (``POST /jobs``).

The service plans each stage as ``align plan`` does (:func:`align.plan_fit.fit_problems`) against the GPU
of ``ALIGN_PLAN_GPU`` for stages that ask for GPUs, and against ``ALIGN_PLAN_CPU_MEMORY_GIB`` (or, with
the service's own local Ray, this machine's RAM) for the others. It reads the base model's ``config.json``
only; a base model it cannot read a config from (full weights published as an artifact, say) is not
planned.
"""

from __future__ import annotations

import os

from align.plan import GPUS, Device, cpu_device
from align.plan_fit import fit_problems
from align.plan_report import PlanError, load_model_config
from align.precision import cpu_bf16
from align.spec import JobSpec
from services.settings import Settings

GiB = 2**30


def plan_device(job: JobSpec, settings: Settings) -> Device | None:
    """The device a job's ranks get, as far as the settings say; None when they do not."""
    if job.resources.gpus_per_worker > 0:
        return GPUS[settings.plan_gpu] if settings.plan_gpu else None
    if settings.plan_cpu_memory_gib is not None:
        memory = settings.plan_cpu_memory_gib * GiB
    elif settings.ray_address is None:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    else:
        return None
    return cpu_device(memory, native_bf16=cpu_bf16()[0])


def capacity_problems(job: JobSpec, settings: Settings, base_model: str) -> list[tuple[str, str]]:
    """``(stages[i], message)`` for each stage that cannot fit; ``base_model`` is the weights the job loads
    (its ``base_model`` with ``artifact:<id>`` adapters followed to their base)."""
    device = plan_device(job, settings)
    if device is None:
        return []
    try:
        return fit_problems(job, load_model_config(base_model), device)
    except PlanError:
        return []  # a config the planner cannot read: the model checks say what is wrong with it, if anything
