"""glibc's mmap threshold, fixed for CPU ranks: blocks a step frees go back to the system."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")

FREE_AFTER_RAISE = """
import sys
from pathlib import Path

import torch

from align.engine.host_memory import fix_mmap_threshold


def rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:"))


if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(), "glibc refused the threshold"
torch.ones(1 << 20).sum()  # a 4 MiB block: mapped, then freed, which raises a dynamic threshold to 4 MiB
before = rss()
freed, kept = [], []
for _ in range(64):
    freed.append(torch.ones(1 << 19))  # 2 MiB, an activation
    kept.append(torch.ones(256))  # 1 KiB that outlives it, as a step's small tensors do
del freed
print((rss() - before) / 2**20)
"""


def resident_after_free(mode: str) -> float:
    """MiB still resident after 64 blocks of 2 MiB were allocated among small tensors and freed, in a fresh
    process whose threshold is glibc's default (``dynamic``) or fixed (``fixed``)."""
    done = subprocess.run([sys.executable, "-c", FREE_AFTER_RAISE, mode], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


def test_a_fixed_threshold_returns_freed_blocks_that_a_raised_one_keeps():
    """128 MiB freed: with glibc's dynamic threshold raised to 4 MiB by one freed block, the 2 MiB blocks
    come from the heap, and the small tensors between them keep it from shrinking; fixed at 1 MiB, each
    block is its own mapping, unmapped when freed."""
    assert resident_after_free("dynamic") > 64
    assert resident_after_free("fixed") < 8

