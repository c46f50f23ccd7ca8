"""Two jobs run in-process, the second continuing the first's policy: the chain the export tests export."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def chain(small_model, small_data, tmp_path_factory):
    """Job ``first`` (SFT, 2 steps) and job ``second`` (DPO, 1 step, ``base_model: artifact:<first's SFT>``)
    in one artifact store, run with the local runner. ``second`` asks for another rank than ``first`` trained,
    which does not apply: it continues ``first``'s adapter."""
    from align.runner import run_job
    from align.spec import parse_spec

    def make_job(model, stages, **overrides):
        return parse_spec({"name": "test", "base_model": str(model), "stages": stages,
                           "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                           "deepspeed": {"zero_stage": 0, "precision": "fp32"}, **overrides})

    tmp = tmp_path_factory.mktemp("chain")
    root = str(tmp / "artifacts")
    first = make_job(small_model, [{"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 8,
                                    "max_steps": 2, "lr": 1e-2, "seed": 3}], name="first")
    (sft,) = run_job(first, work_root=tmp / "work-first", artifact_root=root)
    second = make_job(small_model, [{"type": "dpo", "data": {"path": str(small_data["prefs"])}, "batch_size": 8,
                                     "max_steps": 1, "lr": 1e-2, "beta": 0.1, "seed": 3}],
                      name="second", base_model=f"artifact:{sft.artifact.artifact_id}",
                      adapter={"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0})
    (dpo,) = run_job(second, work_root=tmp / "work-second", artifact_root=root)
    return SimpleNamespace(root=root, sft=sft, dpo=dpo, second=second, work=tmp / "work-second")
