"""Entry point of one rank of a stage: ``python -m align.launch LAUNCH_JSON RESULT_JSON``.

torchrun starts one of these per rank; each reads the :class:`~align.stage_launch.StageLaunch` the
runner wrote. Rank 0 prints its metrics and messages as ``align-event`` JSON lines for
:func:`align.runner.run_stage_with_torchrun` to relay, and writes where the published artifact lives.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from align.runner import RANK_EVENT_PREFIX, run_stage, stage_context
from align.stage_launch import StageLaunch


def _emit(event: dict) -> None:
    print(RANK_EVENT_PREFIX + json.dumps(event), flush=True)


def main(launch_file: str, result_file: str) -> None:
    launch = StageLaunch.model_validate_json(Path(launch_file).read_text())
    if os.environ.get("RANK", "0") == "0":  # the runner relays rank 0's lines only; the others' go to ranks.log
        ctx = stage_context(launch, on_metrics=lambda record: _emit({"metrics": record}),
                            on_message=lambda text, level: _emit({"message": text, "level": level}))
    else:
        ctx = stage_context(launch)
    result = run_stage(ctx)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(result_file).write_text(json.dumps({"uri": result.artifact.uri, "metrics": result.metrics}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
