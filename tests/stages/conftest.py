"""Fixtures of the stage tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from align.runner import run_job
from align.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def parity_sft(tmp_path_factory) -> tuple[dict, str, Path]:
    """The SFT stage of examples/tiny-sft-dpo.yaml in fp32, run once: (the example, the SFT artifact id,
    the artifact root). SFT learns the demonstrations' mistakes, which the preference stages then fix. Shared by
    the tests of every stage that starts from it."""
    example = yaml.safe_load((REPO / "examples" / "tiny-sft-dpo.yaml").read_text())
    example["deepspeed"]["precision"] = "fp32"
    sft = {**example["stages"][0], "eval_exact_match": False}
    root = tmp_path_factory.mktemp("parity")
    (result,) = run_job(parse_spec({**example, "stages": [sft]}), work_root=root / "sft",
                        artifact_root=str(root / "artifacts"))
    return example, result.artifact.artifact_id, root
