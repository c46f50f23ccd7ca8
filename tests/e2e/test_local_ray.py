"""The embedded Ray's start: retried on fresh ports, then one line that says what to do."""

from __future__ import annotations

import socket

import psutil
import pytest

from services import local_ray


def test_a_start_that_keeps_failing_ends_in_one_line_that_says_what_to_do(tmp_path):
    """The dashboard's port is taken on every try (a real `ray start`, which then fails to start it)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        tries = []

        def ports(attempt: int) -> dict[str, int]:
            tries.append(attempt)
            return {**{flag: local_ray.free_port() for flag in local_ray.PORT_FLAGS},
                    "dashboard-port": busy.getsockname()[1]}

        with pytest.raises(local_ray.LocalRayError) as failed:
            local_ray.start(tmp_path / "home", num_cpus=1, attempts=2, pick_ports=ports)
    message = str(failed.value)
    assert tries == [1, 2]
    assert "\n" not in message and message.startswith("the local Ray did not start (2 tries; last: attempt 2: ")
    assert "already occupied" in message and f"(log: {tmp_path / 'home' / 'ray' / 'start-2.log'})" in message
    assert message.endswith("or set ALIGN_RAY_ADDRESS to a running cluster's jobs API")
    assert {p.name for p in (tmp_path / "home" / "ray").iterdir()} == {"start-1.log", "start-2.log"}
    temp_dir = str(local_ray.temp_dir_for(tmp_path / "home"))
    assert len(temp_dir) < 40, "room for Ray's socket paths under the 107-byte limit"
    left = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in p.info["cmdline"] or [])]
    assert not left, "a failed try leaves no Ray process behind"
