"""What the benchmarks share: the child environment, running one side in a child process whose peak
memory is its own, and the memory that side held when its training began."""

from __future__ import annotations

import functools
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


@functools.cache
def build_ops(threads: int) -> None:
    """Compile (or find compiled) DeepSpeed's CPU communication op in a process of its own, once per
    process: ``wait4`` counts a child's waited-for descendants, so a side that compiled it would count the
    compiler in its peak RSS."""
    env = child_environment(threads)
    if env["DS_ACCELERATOR"] == "cpu":
        build = "from align.engine.dist import init_distributed; init_distributed(1)"
        subprocess.run([sys.executable, "-c", build], env=env, cwd=REPO, check=True, capture_output=True)


def run_side(script: str, side: str, config: dict, work: Path, threads: int) -> dict:
    """Run ``script --child side CONFIG RESULT`` and return its result, with ``peak_rss_mib`` from
    ``wait4`` on that child alone."""
    build_ops(threads)
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


def rss_mib() -> float:
    """This process's resident set size now, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class FirstForward:
    """The resident set size when the first module forward of this process begins.

    In a process that runs no forward pass before training (both sides of the benchmarks here), that is
    the memory held just before the first training step: the Python, torch and library baseline, the
    model, the adapter and the prepared data. The hook removes itself after it fires, so later forwards
    pay nothing for it.
    """

    def __init__(self):
        import torch

        self.rss_mib: float | None = None
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        self.rss_mib = rss_mib()
        self._handle.remove()


def device_peak_mib() -> float | None:
    """``torch.cuda.max_memory_allocated`` of this process in MiB; None without CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def child_main(sides: dict) -> None:
    """The child end of :func:`run_side`: run ``sides[side](config)`` and write its result, with the RSS
    at the first forward pass and the peak GPU memory."""
    side, config_file, result_file = sys.argv[2:5]
    config = json.loads(Path(config_file).read_text())
    first = FirstForward()
    result = sides[side](config)
    result.setdefault("rss_before_training_mib", first.rss_mib)
    result.setdefault("peak_gpu_mib", device_peak_mib())
    Path(result_file).write_text(json.dumps(result))
