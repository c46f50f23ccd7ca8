"""Tenant quotas: how many stages a tenant runs at once, how many GPUs they hold, how much its artifacts take.

A queued stage run whose tenant is at a quota waits (:func:`admission` tells the dispatcher why, and the
stage run shows it as ``queued_reason``); a stage that asks for more GPUs than its tenant may ever hold is
refused when the job is posted (:func:`never_fits`). A quota left unset (None) is no limit.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.db.models import RUNNING, Artifact, Job, StageRun, Tenant

GiB = 2**30


def stage_gpus(spec: dict[str, Any], index: int) -> float:
    """GPUs stage ``index`` of a stored spec holds while it runs: its workers times GPUs per worker (the
    stage's own ``resources``, else the job's)."""
    resources = spec["stages"][index].get("resources") or spec.get("resources") or {}
    return resources.get("num_workers", 1) * resources.get("gpus_per_worker", 0.0)


def _size(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= GiB / 10 else f"{value / 2**20:.1f} MiB"


def usage(s: Session, tenant_id: str) -> dict[str, float]:
    """What the tenant uses now: ``running_stages``, ``gpus`` (held by its running stages) and
    ``artifact_bytes`` (its artifacts' files)."""
    running = s.execute(select(StageRun.index, Job.spec).join(Job, StageRun.job_id == Job.id)
                        .where(Job.tenant_id == tenant_id, StageRun.state == RUNNING)).all()
    stored = s.scalar(select(func.coalesce(func.sum(Artifact.size_bytes), 0)).where(Artifact.tenant_id == tenant_id))
    return {"running_stages": len(running), "gpus": sum(stage_gpus(spec, index) for index, spec in running),
            "artifact_bytes": int(stored or 0)}


def admission(s: Session, run: StageRun) -> str | None:
    """Why ``run`` may not start now, or None when its tenant's quotas allow it. A tenant with quotas has its
    row locked before counting, so that two dispatchers claiming for it count one after the other."""
    job = s.get(Job, run.job_id)
    tenant = s.get(Tenant, job.tenant_id)
    if tenant.max_running_stages is None and tenant.max_gpus is None and tenant.max_artifact_bytes is None:
        return None
    s.refresh(tenant, with_for_update=True)
    used = usage(s, tenant.id)
    if tenant.max_running_stages is not None and used["running_stages"] >= tenant.max_running_stages:
        return (f"tenant {tenant.name} runs {used['running_stages']} stage(s) at once, its max_running_stages "
                f"({tenant.max_running_stages}); this one starts when one of them ends")
    need = stage_gpus(job.spec, run.index)
    if tenant.max_gpus is not None and need > 0 and used["gpus"] + need > tenant.max_gpus:
        return (f"tenant {tenant.name}'s running stages hold {used['gpus']:g} of its {tenant.max_gpus:g} GPUs "
                f"(max_gpus) and this stage needs {need:g}; it starts when enough are free")
    if tenant.max_artifact_bytes is not None and used["artifact_bytes"] >= tenant.max_artifact_bytes:
        return (f"tenant {tenant.name}'s artifacts take {_size(used['artifact_bytes'])}, at or over its "
                f"max_artifact_bytes ({_size(tenant.max_artifact_bytes)}); delete artifacts or raise the quota")
    return None


def never_fits(tenant: Tenant, spec: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, message)`` for each stage that asks for more GPUs than the tenant may ever hold at once."""
    if tenant.max_gpus is None:
        return []
    problems = []
    for index, stage in enumerate(spec["stages"]):
        need = stage_gpus(spec, index)
        if need > tenant.max_gpus:
            field = f"stages[{index}].resources" if stage.get("resources") else "resources"
            problems.append((field, f"stage {index} asks for {need:g} GPUs (num_workers x gpus_per_worker) and "
                                    f"tenant {tenant.name} may hold at most {tenant.max_gpus:g} at once (max_gpus); "
                                    "ask for fewer or have the operator raise the quota"))
    return problems
