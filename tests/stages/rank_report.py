"""One rank of a stage that reports what it trained: ``rank_report.py LAUNCH_JSON OUT_DIR``.

Started by torchrun, one process per rank. Runs the stage like ``align.launch`` does and, when the
stage publishes, hashes this rank's view of the trainable parameters (gathered under ZeRO-3) before
the artifact is written. Each rank writes ``OUT_DIR/rank-<r>.json`` with that digest, the stage's
final metrics and the published artifact's location.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names (sorted) and float32 values: equal for the same weights wherever they come from."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def saved_names(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` keyed as peft writes it to adapter_model.safetensors (adapter name dropped)."""
    from peft import PeftModel, get_peft_model_state_dict

    if not isinstance(model, PeftModel):
        return state
    return get_peft_model_state_dict(model, state_dict=state)


def main(launch_file: str, out_dir: str) -> None:
    from align.models.adapters import trainable_state_dict
    from align.runner import run_stage, stage_context
    from align.stage_launch import StageLaunch
    from align.stages import artifact

    ctx = stage_context(StageLaunch.model_validate_json(Path(launch_file).read_text()))
    report: dict = {}
    publish = artifact.publish

    def publish_and_report(stage_ctx, model, tokenizer, rank, **kwargs):
        # Every rank takes part: under ZeRO-3 the gather is collective.
        state = trainable_state_dict(model, stage_ctx.job.deepspeed.zero_stage)
        saved = saved_names(model, state)
        report.update(
            rank=rank.rank,
            world_size=rank.world_size,
            digest=tensors_digest(saved),
            tensors=sorted(saved),
            dtypes=sorted({str(t.dtype) for t in state.values()}),
        )
        return publish(stage_ctx, model, tokenizer, rank, **kwargs)

    artifact.publish = publish_and_report
    try:
        result = run_stage(ctx)
    finally:
        artifact.publish = publish
    report.update(metrics=result.metrics, artifact=result.artifact.uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{report['rank']}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
