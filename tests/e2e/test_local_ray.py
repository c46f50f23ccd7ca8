"""The embedded Ray's start: retried on fresh ports, then one line that says what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import psutil
import pytest

from align.ports import free_port
from services import local_ray


def test_a_start_that_keeps_failing_ends_in_one_line_that_says_what_to_do(tmp_path):
    """The dashboard's port is taken on every try (a real `ray start`, which then fails to start it).

    An address a crashed earlier head left in the (same) temp dir is deleted before a start."""
    temp_dir = local_ray.temp_dir_for(tmp_path / "home")
    temp_dir.mkdir(parents=True, exist_ok=True)
    (temp_dir / "ray_current_cluster").write_text("127.0.0.1:1\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        tries: dict[int, dict[str, int]] = {}

        def ports(attempt: int) -> dict[str, int]:
            tries[attempt] = {**{flag: free_port() for flag in local_ray.PORT_FLAGS},
                              "dashboard-port": busy.getsockname()[1]}
            return tries[attempt]

        with pytest.raises(local_ray.LocalRayError) as failed:
            local_ray.start(tmp_path / "home", num_cpus=1, attempts=2, pick_ports=ports)
    message = str(failed.value)
    assert list(tries) == [1, 2]
    cluster_file = temp_dir / "ray_current_cluster"
    assert not cluster_file.exists() or cluster_file.read_text().strip().endswith(f":{tries[2]['port']}")
    assert "\n" not in message and message.startswith("the local Ray did not start (2 tries; last: attempt 2: ")
    assert "already occupied" in message and f"(log: {tmp_path / 'home' / 'ray' / 'start-2.log'})" in message
    assert message.endswith("or set ALIGN_RAY_ADDRESS to a running cluster's jobs API")
    assert {p.name for p in (tmp_path / "home" / "ray").iterdir()} == {"start-1.log", "start-2.log"}
    temp_dir = str(local_ray.temp_dir_for(tmp_path / "home"))
    assert len(temp_dir) < 40, "room for Ray's socket paths under the 107-byte limit"
    deadline = time.monotonic() + 10  # a process killed a moment ago may still be listed
    while left := _processes_naming(temp_dir):
        assert time.monotonic() < deadline, f"a failed try leaves no Ray process behind: {left}"
        time.sleep(0.5)


def _processes_naming(text: str) -> list[list[str]]:
    """Command lines of the live processes with ``text`` in an argument."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(text in part for part in cmdline):
            found.append(cmdline)
    return found



def test_stop_ends_the_heads_process_group_after_its_leader_is_gone(tmp_path):
    """Like a head whose `ray start` leader died and left its GCS and raylet behind (real processes)."""
    leader = subprocess.Popen(["sh", "-c", "sleep 120 & sleep 120 & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group := _group_members(leader.pid)) < 3:
        assert time.monotonic() < deadline, f"the group did not start: {group}"
        time.sleep(0.1)
    leader.kill()
    leader.wait()
    assert len(_group_members(leader.pid)) == 2, "the two sleeps outlive their leader"
    local_ray.LocalRay(leader, tmp_path, {"port": 0}, tmp_path / "start-1.log").stop(timeout=5)
    deadline = time.monotonic() + 10
    while group := _group_members(leader.pid):
        assert time.monotonic() < deadline, f"stop leaves no process of the group behind: {group}"
        time.sleep(0.2)


def _group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == group:
                members.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members
