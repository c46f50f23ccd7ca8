"""Two ranks on two Ray nodes under ZeRO-2, through the entrypoint: one rank per node, one adapter.

The job's runtime env names ``rank_probe.install`` as the worker set-up hook, so each rank records
the digest of the adapter it holds just before rank 0 publishes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from worker_helpers import adapter_digest, make_ticket, output_of, run_entrypoint, sft_spec

from align.artifacts import ArtifactStore

pytestmark = pytest.mark.slow


def test_two_workers_run_one_per_node_and_agree(ray_cluster, receiver, small_model, small_data, tmp_path):
    probe_dir = tmp_path / "ranks"
    job_config = {
        "runtime_env": {
            "worker_process_setup_hook": "rank_probe.install",
            "env_vars": {"RANK_PROBE_DIR": str(probe_dir)},
        }
    }
    spec = sft_spec(small_model, small_data["sft"], num_workers=2, zero_stage=2, steps=2)
    ticket = make_ticket(receiver, spec, tmp_path)
    done = run_entrypoint(ticket, ray_cluster, env={"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job_config)})
    assert done.returncode == 0, output_of(done)

    (placed,) = [r for r in receiver.of_type("message") if r["payload"]["text"].startswith("ranks placed: ")]
    placement = json.loads(placed["payload"]["text"].removeprefix("ranks placed: "))
    assert [p["rank"] for p in placement] == [0, 1]
    node_ids = {p["node_id"] for p in placement}
    assert node_ids == {node.node_id for node in ray_cluster.list_all_nodes()}, "expected one rank per node"

    ranks = [json.loads((probe_dir / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["node_id"] for r in ranks] == [p["node_id"] for p in placement]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["tensors"] and ranks[0]["tensors"] == ranks[1]["tensors"]
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks disagree on the trained adapter"

    (artifact,) = receiver.of_type("artifact")
    uri = artifact["payload"]["uri"]
    ArtifactStore(ticket["artifact_root"]).verify(uri)
    assert adapter_digest(uri) == ranks[0]["digest"]
    assert artifact["payload"]["metrics"]["steps"] == 2
    losses = [r["payload"]["step"] for r in receiver.of_type("metrics") if "loss" in r["payload"]]
    assert losses == [1, 2]
    assert Path(ticket["work_dir"], "ray", f"{ticket['stage_run_id']}-a1").is_dir()
