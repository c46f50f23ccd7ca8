"""A compile lock left by a killed process is taken over, not waited on for ever; a live builder's is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch.utils.cpp_extension as cpp_extension

from align.engine import op_locks
from align.engine.op_locks import OwnedBaton, use_owned_batons

HOLD = textwrap.dedent("""
    import sys, time
    from align.engine.op_locks import OwnedBaton
    baton = OwnedBaton(sys.argv[1])
    assert baton.try_acquire()
    print("building", flush=True)
    time.sleep(600)
""")


def builder(lock):
    """A process that took the baton and is 'compiling'; returns once it holds it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "building\n"
    return process


@pytest.fixture(autouse=True)
def no_grace(monkeypatch):
    monkeypatch.setattr(op_locks, "GRACE_SECONDS", 0.0)


def test_the_lock_of_a_builder_killed_mid_build_is_taken_over(tmp_path):
    lock = tmp_path / "lock"
    process = builder(lock)
    assert OwnedBaton(str(lock)).try_acquire() is False, "a live builder's lock is left alone"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert lock.exists(), "SIGKILL leaves the file behind"

    baton = OwnedBaton(str(lock))
    assert baton.try_acquire() is True
    assert lock.exists()
    baton.release()
    assert not lock.exists()


def test_a_waiter_stops_waiting_when_the_builder_dies(tmp_path):
    lock = tmp_path / "lock"
    process = builder(lock)
    waited = []
    started = time.monotonic()
    baton = OwnedBaton(str(lock), wait_seconds=0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    baton.wait()
    waited.append(time.monotonic() - started)
    assert not lock.exists() and waited[0] < 10


def test_a_file_younger_than_the_grace_period_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(op_locks, "GRACE_SECONDS", 60.0)
    lock = tmp_path / "lock"
    lock.write_text("")  # created a moment ago by a builder about to take its lock
    assert OwnedBaton(str(lock)).try_acquire() is False
    assert lock.exists()


def test_torchs_extension_loader_uses_the_owned_baton(monkeypatch):
    monkeypatch.setattr(cpp_extension, "FileBaton", cpp_extension.FileBaton)
    use_owned_batons()
    assert cpp_extension.FileBaton is OwnedBaton
