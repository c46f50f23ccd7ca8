"""Whether a submitted job's stages fit the memory of the workers that will run them (``POST /jobs``).

The service plans each stage as ``align plan`` does (:func:`align.plan_fit.fit_problems`) against the GPU
of ``ALIGN_PLAN_GPU`` for stages that ask for GPUs, and against ``ALIGN_PLAN_CPU_MEMORY_GIB`` (or, with
the service's own local Ray, this machine's RAM) for the others. It reads the base model's ``config.json``
only; a base model it cannot read a config from (full weights published as an artifact, say), or whose
config does not give its size, is not planned.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from align.plan import GPUS, Device, cpu_device
from align.plan_fit import fit_problems
from align.plan_report import PlanError, load_model_config
from align.precision import cpu_bf16
from align.spec import JobSpec, ResourcesSpec
from services.settings import Settings

GiB = 2**30


def plan_device(resources: ResourcesSpec, settings: Settings) -> Device:
    """The device a stage's ranks get, as far as the settings say; its memory is None (nothing is refused)
    when they do not say."""
    if resources.gpus_per_worker > 0:
        return GPUS[settings.plan_gpu] if settings.plan_gpu else replace(GPUS["h100"], memory=None)
    if settings.plan_cpu_memory_gib is not None:
        memory = settings.plan_cpu_memory_gib * GiB
    elif settings.ray_address is None:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    else:
        memory = None
    return cpu_device(memory, native_bf16=cpu_bf16()[0])


def names_its_width(base_model: str) -> bool:
    """Whether the base model's ``config.json`` gives its hidden size (every saved transformers config
    does); a bare one such as ``{"model_type": "llama"}`` would be planned at that type's default size,
    which is a guess, not the model, so it is not planned."""
    if base_model == "builtin:tiny":
        return True
    path = Path(base_model.removeprefix("file://")).expanduser()
    try:
        data = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and any(key in data for key in ("hidden_size", "n_embd", "d_model"))


def capacity_problems(job: JobSpec, settings: Settings, base_model: str) -> list[tuple[str, str]]:
    """``(stages[i], message)`` for each stage that cannot fit; ``base_model`` is the weights the job loads
    (its ``base_model`` with ``artifact:<id>`` adapters followed to their base)."""
    devices = [plan_device(job.stage_resources(i), settings) for i in range(len(job.stages))]
    if all(device.memory is None for device in devices) or not names_its_width(base_model):
        return []
    try:
        return fit_problems(job, load_model_config(base_model), devices.__getitem__)
    except PlanError:
        return []  # a config the planner cannot read: the model checks say what is wrong with it, if anything
