"""DeepSpeed's compiled-op cache follows align's cache setting without help from the Makefile."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRINT_AFTER_IMPORT = "import os, align.engine; print(os.environ['TORCH_EXTENSIONS_DIR'])"


def run_python(code: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout.strip()


def test_importing_the_engine_points_the_op_cache_under_the_align_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["ALIGN_CACHE_DIR"] = str(tmp_path / "cache")
    assert run_python(PRINT_AFTER_IMPORT, env) == str(tmp_path / "cache" / "torch_extensions")


def test_a_torch_extensions_dir_the_user_set_is_kept(tmp_path):
    env = dict(os.environ, ALIGN_CACHE_DIR=str(tmp_path / "cache"), TORCH_EXTENSIONS_DIR=str(tmp_path / "mine"))
    assert run_python(PRINT_AFTER_IMPORT, env) == str(tmp_path / "mine")
