"""The precision a stage trains in, chosen from the hardware it runs on.

bf16 halves memory traffic and runs at full speed only where the hardware computes in bf16: CUDA
devices that support it (compute capability 8.0 and later), and CPUs with AVX512-BF16 or AMX whose
instructions torch and oneDNN are allowed to use. Elsewhere (AVX2-only x86 CPUs, most ARM servers) a
bf16 matrix product is emulated and runs tens of times slower than fp32: on a 2-core AVX2 machine one
512x512 product ran at 1.1 GFLOP/s in bf16 against 45.6 in fp32. ``precision: auto`` therefore means
bf16 where it is native and fp32 everywhere else; an explicit ``bf16`` is honoured with a warning that
gives the slowdown measured on the machine.

``ATEN_CPU_CAPABILITY`` (torch's kernels) and ``ONEDNN_MAX_CPU_ISA`` (oneDNN's) cap the instructions
the libraries use; a CPU with AVX512-BF16 held to AVX2 by either is treated as one without it.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from align.spec import PRECISION_SUMMARY_PREFIX as SUMMARY_PREFIX

PRECISIONS = ("auto", "fp32", "bf16")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# oneDNN ISA caps below AVX512_CORE_BF16: with one of these set, oneDNN emulates bf16 matrix products.
_ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class PrecisionChoice:
    """What a stage was asked to train in, what it trains in, and why."""

    requested: str
    """The spec's ``deepspeed.precision``: auto, fp32 or bf16."""
    precision: str
    """What the stage trains in: fp32 or bf16."""
    device: str
    """The hardware it was chosen for, e.g. ``cpu (AVX512, Intel Xeon)`` or ``cuda (NVIDIA H200)``."""
    native_bf16: bool
    """Whether that hardware computes in bf16 at full speed."""
    reason: str
    """One sentence: why this precision."""
    warning: str | None = None
    """Set when an explicit bf16 runs on hardware that only emulates it."""
    bf16_slowdown: float | None = None
    """Measured time of a bf16 matrix product over an fp32 one on this CPU (set with ``warning``)."""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return f"{SUMMARY_PREFIX}{self.precision} ({self.requested} on {self.device}): {self.reason}"


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels use: ``AVX512``, ``AVX2``, ``DEFAULT``, ``SVE256``, ..."""
    return torch.backends.cpu.get_cpu_capability()


def onednn_isa_cap() -> str | None:
    """The ``ONEDNN_MAX_CPU_ISA`` (or older ``DNNL_MAX_CPU_ISA``) cap on oneDNN's instructions, if set."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.upper() if value else None


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of ``keys`` (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is not available)."""
    return frozenset((_cpuinfo("flags", "Features") or "").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


_FROM_THIS_MACHINE = object()


def cpu_bf16(
    flags=_FROM_THIS_MACHINE, capability=_FROM_THIS_MACHINE, onednn_cap=_FROM_THIS_MACHINE
) -> tuple[bool, str]:
    """Whether a CPU runs bf16 natively under the library caps, and why: pure in the arguments given
    (its flags, torch's capability, oneDNN's cap or None), this machine's for those left out."""
    flags = cpu_flags() if flags is _FROM_THIS_MACHINE else flags
    capability = cpu_capability() if capability is _FROM_THIS_MACHINE else capability
    onednn_cap = onednn_isa_cap() if onednn_cap is _FROM_THIS_MACHINE else onednn_cap
    hardware = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not hardware:
        return False, f"the CPU has no AVX512-BF16 or AMX (torch uses {capability})"
    if capability != "AVX512":
        return False, (f"the CPU has {'/'.join(hardware)} but torch's kernels are capped at {capability} "
                       "(ATEN_CPU_CAPABILITY)")
    if onednn_cap in _ONEDNN_CAPS_WITHOUT_BF16:
        return False, (f"the CPU has {'/'.join(hardware)} but oneDNN is capped at {onednn_cap} "
                       "(ONEDNN_MAX_CPU_ISA)")
    return True, f"the CPU has {'/'.join(hardware)} and torch uses {capability} kernels"


@functools.cache
def measured_bf16_slowdown(size: int = 256, seconds: float = 0.05) -> float:
    """Time of a ``size``-square bf16 matrix product over an fp32 one on one CPU thread (best of several)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            # A generator of its own: measuring must not move the global RNG that stages seed.
            generator = torch.Generator().manual_seed(0)
            a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
            a @ b
            fastest, deadline = float("inf"), time.perf_counter() + seconds
            for _ in range(50):
                started = time.perf_counter()
                a @ b
                fastest = min(fastest, time.perf_counter() - started)
                if time.perf_counter() > deadline:
                    break
            best[dtype] = fastest
        return best[torch.bfloat16] / max(best[torch.float32], 1e-9)
    finally:
        torch.set_num_threads(threads)


def resolve(requested: str, device: torch.device | str | None = None) -> PrecisionChoice:
    """The precision to train in on ``device`` (this process's CUDA device if it has one, else the CPU)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {list(PRECISIONS)}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        where = f"cuda ({name})"
        why = f"{name} {'computes' if native else 'does not compute'} in bf16 natively"
    else:
        native, why = cpu_bf16()
        where = f"cpu ({cpu_capability()}, {cpu_model()})"
    if requested == "fp32":
        return PrecisionChoice(requested, "fp32", where, native, "fp32 was asked for")
    if requested == "auto":
        return PrecisionChoice(requested, "bf16" if native else "fp32", where, native, why)
    if native:
        return PrecisionChoice(requested, "bf16", where, native, "bf16 was asked for")
    if device.type == "cuda":
        slowdown, measured = None, ""
    else:
        slowdown = round(measured_bf16_slowdown(), 1)
        measured = f": a bf16 matrix product ran {slowdown:.0f}x slower than fp32 on this machine"
    warning = (
        f"deepspeed.precision: bf16 was asked for, but bf16 is emulated here ({why}){measured}. "
        "Training proceeds in bf16; set deepspeed.precision to auto (or fp32) to train at full speed."
    )
    return PrecisionChoice(requested, "bf16", where, native, "bf16 was asked for", warning, slowdown)


def hardware_summary() -> dict:
    """The CPU (and GPU) this process runs on, as benchmarks and CI logs record it."""
    native, why = cpu_bf16()
    summary = {
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "onednn_isa_cap": onednn_isa_cap(),
        "cpu_native_bf16": native,
        "cpu_bf16_reason": why,
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        summary["gpu"] = torch.cuda.get_device_name()
    return summary


def main() -> None:
    """``python -m align.precision``: print what this machine trains in and why (CI logs start with it)."""
    for key, value in hardware_summary().items():
        print(f"{key}: {value}")
    choice = resolve("auto")
    print(f"auto -> {choice.summary()}")
    print(f"bf16/fp32 matmul time on one thread: {measured_bf16_slowdown():.1f}x")


if __name__ == "__main__":
    main()
