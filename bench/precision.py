"""What ``precision: auto`` buys on this machine: SFT tokens/s on the built-in tiny model in auto, fp32 and bf16.

Each precision trains the same SFT steps (``builtin:parity/sft``, LoRA r=16, ZeRO-0, one rank) in a child
process of its own, the precisions taking turns over ``--repeats`` rounds, and the script prints the
fastest run's tokens/s over the steps after the warm-up, the precision each
run resolved to and why, and the ratio of each to auto. On hardware that computes in bf16 (CUDA devices
that support it, CPUs with AVX512-BF16 or AMX) auto is bf16; elsewhere it is fp32 and explicit bf16 is
many times slower. Hold a CPU with AVX512-BF16 to AVX2 to see the second case::

    .venv/bin/python bench/precision.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/precision.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

REPO = harness.REPO
PRECISIONS = ("auto", "fp32", "bf16")


def job_spec(precision: str, steps: int, threads: int) -> dict:
    return {
        "name": f"bench-precision-{precision}",
        "base_model": "builtin:tiny",
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "deepspeed": {"zero_stage": 0, "precision": precision},
        "resources": {"num_workers": 1, "cpus_per_worker": threads},
        "stages": [{"type": "sft", "data": {"path": "builtin:parity/sft"}, "max_steps": steps, "batch_size": 16,
                    "max_length": 64, "lr": 1e-3, "checkpoint_every": None}],
    }


def child_main(config_file: str, result_file: str) -> None:
    """One precision's run: train, then report the timed tokens/s, grad norms and the resolved precision."""
    sys.path.insert(0, str(REPO))
    from align.runner import run_job
    from align.spec import parse_spec

    config = json.loads(Path(config_file).read_text())
    work = Path(config["work"])
    stamps: list[tuple[float, dict]] = []
    messages: list[str] = []
    (result,) = run_job(
        parse_spec(config["spec"]), work_root=work / "runs", artifact_root=str(work / "artifacts"),
        on_metrics=lambda _, record: stamps.append((time.perf_counter(), record)),
        on_message=lambda _, text, level: messages.append(f"{level}: {text}"),
    )
    steps = [(at, r) for at, r in stamps if "tokens_per_s" in r]
    warmup = config["warmup"]
    timed = steps[warmup:]
    seconds = timed[-1][0] - steps[warmup - 1][0]
    # tokens_per_s is per step: weight each by its step's duration to get the total over the timed steps.
    durations = [b[0] - a[0] for a, b in zip(steps[warmup - 1 :], timed)]
    tokens = sum(r["tokens_per_s"] * d for (_, r), d in zip(timed, durations))
    Path(result_file).write_text(json.dumps({
        "tokens_per_s": tokens / seconds,
        "grad_norms_finite": all(math.isfinite(r["grad_norm"]) for _, r in steps),
        "precision": result.artifact.manifest.precision,
        "messages": messages,
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and left out of the timing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each precision, in turn; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    if min(args.warmup, args.steps, args.repeats) < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for precision in PRECISIONS:
            side = work / f"{precision}-{repeat}"
            side.mkdir()
            config = {"spec": job_spec(precision, args.warmup + args.steps, args.threads), "warmup": args.warmup,
                      "work": str(side)}
            runs.setdefault(precision, []).append(harness.run_side(__file__, precision, config, side, args.threads))
    results = {precision: max(done, key=lambda r: r["tokens_per_s"]) for precision, done in runs.items()}

    print(f"\nSFT on builtin:tiny, LoRA r=16, ZeRO-0, 16 rows x 64 tokens a step; {args.steps} timed steps after "
          f"{args.warmup} warm-up; {args.threads} threads; the fastest of {args.repeats} runs each")
    print(harness.machine())
    print(f"{'asked':<7}{'trained in':<12}{'tokens/s':>10}{'vs auto':>9}{'peak RSS MiB':>14}  why")
    for precision, result in results.items():
        chosen = result["precision"]
        ratio = result["tokens_per_s"] / results["auto"]["tokens_per_s"]
        print(f"{precision:<7}{chosen['precision']:<12}{result['tokens_per_s']:>10,.0f}{ratio:>8.2f}x"
              f"{result['peak_rss_mib']:>14,.0f}  {chosen['reason']}")
        if not result["grad_norms_finite"]:
            print(f"error: {precision} logged a non-finite gradient norm")
        if chosen.get("warning"):
            print(f"  warning: {chosen['warning']}")
    if args.repeats > 1:
        for precision, done in runs.items():
            print(f"{precision} tokens/s of each run: {', '.join(format(r['tokens_per_s'], ',.0f') for r in done)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": harness.machine(), "results": results}, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["grad_norms_finite"] for r in results.values()) else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[3:])
    else:
        sys.exit(main())
