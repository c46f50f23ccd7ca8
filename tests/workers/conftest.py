"""Worker test set-up: one local 2-node Ray cluster per session and a report receiver per test.

The cluster has two nodes of one CPU each, so a two-worker stage must place one rank per node.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests" / "stages"))  # rank_report.tensors_digest


@pytest.fixture(scope="session")
def ray_cluster():
    """Two Ray nodes (head and one worker node) of 1 CPU each, started once for the session."""
    from ray.cluster_utils import Cluster

    # Raylets pass their environment on to every worker they start: the rank probe must import there.
    saved_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(REPO / "tests" / "stages"), os.environ.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    started = time.perf_counter()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, include_dashboard=False)
    cluster.wait_for_nodes()
    cluster.start_seconds = time.perf_counter() - started
    yield cluster
    cluster.shutdown()
    if saved_pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved_pythonpath


@pytest.fixture
def receiver():
    from worker_helpers import Receiver

    server = Receiver()
    yield server
    server.close()
