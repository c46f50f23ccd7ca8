"""``bench/gpu.py --size tiny``: the GPU plan run on the CPU with the tiny model, one timed step a row.

The GPU call is made once, with little time to spare; this dry run checks, on every CI run, that each
planned row runs (or says why it did not) and that the JSON it writes holds what the report needs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import gpu  # noqa: E402

pytestmark = pytest.mark.slow


def test_dry_run_reports_every_planned_row(tmp_path):
    result_file = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    finished = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--size", "tiny", "--json", str(result_file)],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    summary = json.loads(result_file.read_text())

    rows = {row["name"]: row for row in summary["rows"]}
    assert list(rows) == [name for _, _, name in gpu.ROWS]
    for name, row in rows.items():
        if row["status"] == "skipped":
            assert row["reason"].strip(), name
            continue
        assert row["status"] == "ran", name
        rate = row["samples_per_s"] if row["comparison"] == "grpo" else row["tokens_per_s"]
        assert rate > 0, name
        assert row["seconds"] > 0, name
        assert row["peak_rss_mib"] > row["rss_before_training_mib"] > 0, name
        assert row["working_set_mib"] == pytest.approx(row["peak_rss_mib"] - row["rss_before_training_mib"])
        assert "peak_gpu_mib" in row, name  # None on the CPU
        if row["comparison"] != "grpo":
            assert row["model_tflops_per_s"] > 0 and row["attention_tflops_per_s"] > 0, name
    # TRL 1.16 turns DPO's padding_free off; its row says so in TRL's words.
    assert rows["DPO TRL padding-free"]["status"] == "skipped"
    assert "padding_free" in rows["DPO TRL padding-free"]["reason"]

    ran = {name for name, row in rows.items() if row["status"] == "ran"}
    expected = {label for label, (top, bottom) in gpu.RATIO_PAIRS.items() if top in ran and bottom in ran}
    assert set(summary["ratios"]) == expected
    assert {"DPO align/TRL", "SFT align/TRL", "GRPO align/TRL", "DPO ZeRO-3/ZeRO-0"} <= expected
    for label, ratio in summary["ratios"].items():
        assert {"speed", "peak_rss", "working_set"} <= set(ratio), label
        assert all(math.isfinite(value) and value > 0 for value in ratio.values()), label
