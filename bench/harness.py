"""What the benchmarks share: the child environment, and running one side in a child process whose
peak memory is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child_environment(threads: int) -> dict[str, str]:
    """Offline, the repository on the path, ``threads`` torch threads, and CPU DeepSpeed unless
    DS_ACCELERATOR names another accelerator."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.setdefault("DS_ACCELERATOR", "cpu")  # set DS_ACCELERATOR=cuda to run the sides on a GPU
    env.setdefault("ALIGN_CACHE_DIR", str(REPO / ".align" / "cache"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".align" / "cache" / "torch_extensions"))
    return env


def machine() -> str:
    """The CPU and its instruction-set caps, printed beside every ratio: bf16 speed depends on them."""
    from align.precision import hardware_summary

    found = hardware_summary()
    return (
        f"machine: {found['cpu']}, {os.cpu_count()} CPUs; torch capability {found['cpu_capability']}, oneDNN cap "
        f"{found['onednn_isa_cap'] or 'none'}; native bf16: {'yes' if found['cpu_native_bf16'] else 'no'}"
    )


def run_side(script: str, side: str, config: dict, work: Path, threads: int) -> dict:
    """Run ``script --child side CONFIG RESULT`` and return its result, with ``peak_rss_mib`` from
    ``wait4`` on that child alone."""
    config_file, result_file, log_file = (work / f"{side}.{name}" for name in ("config.json", "result.json", "log"))
    config_file.write_text(json.dumps(config))
    command = [sys.executable, str(Path(script).resolve()), "--child", side, str(config_file), str(result_file)]
    with log_file.open("w") as log:
        process = subprocess.Popen(
            command, env=child_environment(threads), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(process.pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"the {side} side exited with {returncode}; last lines of {log_file}:\n{tail}")
    result = json.loads(result_file.read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result
