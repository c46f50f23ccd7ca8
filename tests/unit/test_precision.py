"""Choosing the training precision from the hardware: the rule, and what AVX2-held torch reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from align import precision
from align.precision import cpu_bf16, resolve

BF16_CPU = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX2_CPU = frozenset({"avx2", "fma", "f16c"})
# ATEN_CPU_CAPABILITY holds torch's kernels to AVX2 and ONEDNN_MAX_CPU_ISA holds oneDNN's: together they
# make a CPU with AVX512-BF16 behave like one without it.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_bf16_is_native_only_with_the_instructions_and_no_cap():
    reason = "the CPU has amx_bf16/avx512_bf16 and torch uses AVX512 kernels"
    assert cpu_bf16(BF16_CPU, "AVX512", None) == (True, reason)
    assert cpu_bf16(frozenset({"avx512_bf16"}), "AVX512", "AVX512_CORE_AMX")[0]

    native, why = cpu_bf16(AVX2_CPU, "AVX2", None)
    assert not native and why == "the CPU has no AVX512-BF16 or AMX (torch uses AVX2)"
    native, why = cpu_bf16(BF16_CPU, "AVX2", None)
    assert not native and "ATEN_CPU_CAPABILITY" in why
    native, why = cpu_bf16(BF16_CPU, "AVX512", "AVX2")
    assert not native and "ONEDNN_MAX_CPU_ISA" in why
    # AVX-512 without BF16 (Skylake-SP, Ice Lake) emulates bf16 too.
    assert not cpu_bf16(frozenset({"avx512f", "avx512bw"}), "AVX512", None)[0]


def test_auto_follows_the_hardware_and_fp32_is_always_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: (True, "native"))
    assert resolve("auto", "cpu").precision == "bf16"
    assert resolve("fp32", "cpu").precision == "fp32"
    assert resolve("bf16", "cpu").warning is None

    monkeypatch.setattr(precision, "cpu_bf16", lambda: (False, "emulated"))
    monkeypatch.setattr(precision, "measured_bf16_slowdown", lambda: 41.66)
    choice = resolve("auto", "cpu")
    assert (choice.precision, choice.reason, choice.warning) == ("fp32", "emulated", None)
    explicit = resolve("bf16", "cpu")
    assert explicit.precision == "bf16" and explicit.bf16_slowdown == 41.7
    assert "42x slower than fp32" in explicit.warning and "deepspeed.precision" in explicit.warning
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve("fp16", "cpu")


def _resolve_in_child(env: dict) -> dict:
    code = (
        "import json; from align.precision import resolve, cpu_capability;"
        "a, b = resolve('auto', 'cpu'), resolve('bf16', 'cpu');"
        "print(json.dumps({'capability': cpu_capability(), 'auto': a.to_dict(), 'bf16': b.to_dict()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_a_cpu_held_to_avx2_trains_in_fp32_and_warns_of_the_measured_bf16_slowdown():
    held = _resolve_in_child(AVX2_ENV)
    assert held["capability"] == "AVX2"
    assert held["auto"]["precision"] == "fp32" and not held["auto"]["native_bf16"]
    assert held["bf16"]["precision"] == "bf16"
    # Emulated bf16 measures 40-100x slower than fp32 on AVX2 (1.1 vs 45.6 GFLOP/s on one core).
    assert held["bf16"]["bf16_slowdown"] > 5, held["bf16"]
    assert "slower than fp32" in held["bf16"]["warning"]


def test_this_machine_resolves_auto_by_its_own_flags():
    mine = _resolve_in_child({})
    native, _ = cpu_bf16()
    assert mine["auto"]["precision"] == ("bf16" if native else "fp32")
    assert (mine["bf16"]["warning"] is None) == native
