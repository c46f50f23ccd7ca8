"""A Ray worker set-up hook for tests: each rank records the adapter it is about to publish.

Named as ``worker_process_setup_hook`` in the job's runtime env; ``RANK_PROBE_DIR`` says where each
rank writes ``rank-<r>.json`` with its node id and a digest of its trainable parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def install() -> None:
    if not os.environ.get("RANK_PROBE_DIR"):
        return
    from rank_report import saved_names, tensors_digest

    from align.models.adapters import trainable_state_dict
    from align.stages import artifact

    publish = artifact.publish

    def publish_and_record(ctx, model, tokenizer, rank, **kwargs):
        import ray

        # Every rank takes part: under ZeRO-3 the gather is collective.
        saved = saved_names(model, trainable_state_dict(model, ctx.job.deepspeed.zero_stage))
        out = Path(os.environ["RANK_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": rank.rank,
            "world_size": rank.world_size,
            "node_id": ray.get_runtime_context().get_node_id(),
            "digest": tensors_digest(saved),
            "tensors": sorted(saved),
        }
        (out / f"rank-{rank.rank}.json").write_text(json.dumps(record))
        return publish(ctx, model, tokenizer, rank, **kwargs)

    artifact.publish = publish_and_record
