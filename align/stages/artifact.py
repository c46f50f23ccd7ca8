"""What a stage leaves behind: its trained model, tokenizer, logs and card, published as one artifact
with the stage's final metrics."""

from __future__ import annotations

import json
from typing import Any

import torch

from align.artifacts import ArtifactNotFound, ArtifactStore
from align.engine.dist import Rank, broadcast_from_main
from align.gates import check_gate, starting_value
from align.model_card import base_model_license, write_model_card
from align.models.adapters import save_trainable
from align.models.load import adapter_base_reference, resolve_base_model
from align.stages.context import StageContext, StageResult


def final_metrics(records: list[dict], keys: list[str]) -> dict:
    """The last value of each key among the logged records."""
    out: dict[str, Any] = {}
    for record in records:
        for key in keys:
            if key in record:
                out[key] = record[key]
    return out


def publish(
    ctx: StageContext,
    model: torch.nn.Module,
    tokenizer,
    rank: Rank,
    *,
    kind: str,
    metrics: dict,
    fingerprints: dict[str, str],
) -> StageResult:
    """Save what the stage trained with its model card and publish it as a versioned artifact (manifest
    written last), with the event files and MLflow run of the job's ``report_to``. ``adapter_config.json``
    and the card name the base model as the spec did (:func:`align.model_card.base_model_reference`), never
    the local folder it was loaded from; after ``base_model: artifact:<id>``, the base that artifact's adapter
    names (:func:`align.models.load.adapter_base_reference`)."""
    ctx.phase("publishing")
    out_dir = ctx.work_dir / "artifact"
    base_reference = adapter_base_reference(ctx.job.base_model, ctx.artifact_root)
    save_trainable(model, out_dir, ctx.job.deepspeed.zero_stage, write=rank.is_main, base_model=base_reference)
    published = None
    if rank.is_main:
        tokenizer.save_pretrained(out_dir)
        for log in ("metrics.jsonl", "samples.jsonl"):
            if (ctx.work_dir / log).exists():
                (out_dir / log).write_bytes((ctx.work_dir / log).read_bytes())
        precision = ctx.precision.to_dict() if ctx.precision else None
        tracking = ctx.tracker.close_files(out_dir) if ctx.tracker else None
        gate = decide_gate(ctx, metrics)
        write_model_card(
            out_dir, ctx.job, ctx.index, kind=kind, lineage=ctx.lineage, parents=list(ctx.parents),
            data_fingerprints=fingerprints, metrics=metrics, precision=precision, job_id=ctx.job_id,
            base_model=base_reference,
            license=base_model_license(resolve_base_model(ctx.job.base_model, artifact_root=ctx.artifact_root)),
        )
        published = ArtifactStore(ctx.artifact_root).publish(
            out_dir,
            lineage=ctx.lineage,
            kind=kind,
            stage=_stage_record(ctx),
            base_model=ctx.job.base_model,
            spec_hash=ctx.job.hash(),
            parents=list(ctx.parents),
            data_fingerprints=fingerprints,
            metrics=metrics,
            job={"id": ctx.job_id, "name": ctx.job.name},
            precision=precision,
            tracking=tracking,
            gate=gate,
        )
        if gate is not None:
            ctx.message(f"gate {'passed' if gate['passed'] else 'failed'}: {gate['reason']}",
                        "info" if gate["passed"] else "error")
        if ctx.tracker is not None:
            ctx.tracker.end(published.artifact_id)
    published = broadcast_from_main(published)
    return StageResult(published, metrics)


def decide_gate(ctx: StageContext, metrics: dict) -> dict | None:
    """The stage's gate decided on its final ``metrics`` (None without a gate). The parent's value for
    ``min_delta_vs_parent`` is the stage's step-0 evaluation of its starting policy, else the same metric
    in the start policy's manifest (the first parent)."""
    gate = ctx.stage.gate
    if gate is None:
        return None
    baseline = None
    if gate.min_delta_vs_parent is not None:
        log = ctx.work_dir / "metrics.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
        baseline = starting_value(records, gate.metric)
        if baseline is None and ctx.parents:
            try:
                parent = ArtifactStore(ctx.artifact_root).get(f"artifact:{ctx.parents[0]}")
                baseline = parent.manifest.metrics.get(gate.metric)
            except ArtifactNotFound:
                baseline = None
    return check_gate(gate, metrics.get(gate.metric), baseline).to_dict()


def _stage_record(ctx: StageContext) -> dict:
    """The manifest's ``stage``; under the service it names the stage run and attempt, so that an attempt
    that runs again reuses what it published (:meth:`ArtifactStore.publish`)."""
    stage = {"type": ctx.stage.type, "index": ctx.index, "name": ctx.name}
    if ctx.stage_run_id is not None and ctx.attempt is not None:
        stage.update(stage_run_id=ctx.stage_run_id, attempt=ctx.attempt)
    return stage

