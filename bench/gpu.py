"""One call on one GPU: align against TRL on a 1.1B Llama, and what ZeRO-3 and QLoRA cost align.

The model is a random-init Llama of TinyLlama's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, 32k vocabulary) in bf16, built once under the cache by ``bench/train_vs_trl.py``
(``--model 1b``). Every row is one side in a process of its own, run by ``bench/train_vs_trl.py`` and
``bench/rl_vs_trl.py`` (their ``compare`` functions, with their flags), in this order:

1. DPO, 8 pairs a step, every sequence 1,024 tokens, live reference: align (ZeRO-0), TRL ``DPOTrainer``,
   TRL with ``padding_free`` (reported as not run where TRL turns it off).
2. SFT, 16 rows a step of 1,024 tokens: align, TRL ``SFTTrainer``, TRL padding-free.
3. GRPO, 8 prompts x 8 samples a step, up to 128 new tokens: align, TRL ``GRPOTrainer``.
4. DPO as in 1, align on ZeRO-3 (one GPU).
5. DPO as in 1, align with QLoRA (nf4, double quantisation, ZeRO-0).

It prints the ratios, tokens/s (samples/s for GRPO), peak GPU memory (``torch.cuda.max_memory_allocated``
of each side's process) and MFU: 6 x (trainable and frozen parameters) x tokens/s over the GPU's bf16
dense peak (989 TFLOP/s on an H100 or H200; ``--peak-tflops`` for others). The 6 x N count leaves out
the DPO reference forward (2 x N more per token) and attention; attention's own rate, 6 x layers x
sequence length x hidden size per token (causal, forward and backward), is printed beside it. The JSON
file (``--json``) is rewritten after each comparison, so a run cut short still leaves what it measured.

``--size tiny`` runs the same plan on the CPU with ``builtin:tiny``, sequences of 128 tokens and one
timed step after one warm-up per row: a dry run that every row runs and reports. QLoRA runs there only if
bitsandbytes quantises, runs and back-propagates a 4-bit layer on the CPU; otherwise the row is skipped
with the reason.

On the GPU machine (torch 2.11, no Ray or FastAPI; the wheels of deepspeed, datasets, pydantic, trl,
bitsandbytes and their small dependencies carried in ``.whl/``, see ``/work/shared/GPU.md``), from the
repository root; about 8 minutes with the default steps:

    pip install -q --no-deps --no-index .whl/*.whl
    DS_ACCELERATOR=cuda python bench/gpu.py --json "$OUT/gpu.json"

On the CPU:

    .venv/bin/python bench/gpu.py --size tiny --json /tmp/gpu-tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import rl_vs_trl
import train_vs_trl

H200_BF16_DENSE_TFLOPS = 989.0
PLANS = {
    "1b": {
        "model": "1b", "bf16": True, "max_length": 1024,
        "dpo": {"batch": 8, "steps": 8, "warmup": 2},
        "sft": {"batch": 16, "steps": 8, "warmup": 2},
        "grpo": {"prompts": 8, "group": 8, "max_new_tokens": 128, "max_length": 384, "steps": 2, "warmup": 1},
        "zero3": {"steps": 3, "warmup": 1},
        "qlora": {"steps": 6, "warmup": 2},
    },
    "tiny": {
        "model": "builtin:tiny", "bf16": False, "max_length": 128,
        "dpo": {"batch": 2, "steps": 1, "warmup": 1},
        "sft": {"batch": 4, "steps": 1, "warmup": 1},
        "grpo": {"prompts": 2, "group": 2, "max_new_tokens": 8, "max_length": 128, "steps": 1, "warmup": 1},
        "zero3": {"steps": 1, "warmup": 1},
        "qlora": {"steps": 1, "warmup": 1},
    },
}
ROWS = [
    ("dpo", "align", "DPO align ZeRO-0"), ("dpo", "trl", "DPO TRL"),
    ("dpo", "trl_padding_free", "DPO TRL padding-free"),
    ("sft", "align", "SFT align"), ("sft", "trl", "SFT TRL"), ("sft", "trl_padding_free", "SFT TRL padding-free"),
    ("grpo", "align", "GRPO align"), ("grpo", "trl", "GRPO TRL"),
    ("zero3", "align", "DPO align ZeRO-3"), ("qlora", "align", "DPO align QLoRA nf4"),
]
"""Every row the plan reports, as (comparison, side, name)."""
RATIO_PAIRS = {
    "DPO align/TRL": ("DPO align ZeRO-0", "DPO TRL"),
    "DPO align/TRL padding-free": ("DPO align ZeRO-0", "DPO TRL padding-free"),
    "SFT align/TRL": ("SFT align", "SFT TRL"),
    "SFT align/TRL padding-free": ("SFT align", "SFT TRL padding-free"),
    "GRPO align/TRL": ("GRPO align", "GRPO TRL"),
    "DPO ZeRO-3/ZeRO-0": ("DPO align ZeRO-3", "DPO align ZeRO-0"),
    "DPO QLoRA/LoRA": ("DPO align QLoRA nf4", "DPO align ZeRO-0"),
}
"""The ratios reported, as (numerator row, denominator row), where both ran."""


def train_argv(plan: dict, comparison: str) -> list[str]:
    """``bench/train_vs_trl.py`` flags for a DPO or SFT comparison of ``plan``."""
    stage = "sft" if comparison == "sft" else "dpo"
    steps = plan[comparison]
    argv = ["--stage", stage, "--lengths", "full", "--model", plan["model"], "--max-length", str(plan["max_length"]),
            "--batch", str(plan[stage]["batch"]), "--steps", str(steps["steps"]), "--warmup", str(steps["warmup"])]
    argv += ["--bf16"] if plan["bf16"] else []
    if comparison == "zero3":
        argv += ["--sides", "align", "--zero-stage", "3"]
    elif comparison == "qlora":
        argv += ["--sides", "align", "--qlora"]
    return argv


def grpo_argv(plan: dict) -> list[str]:
    """``bench/rl_vs_trl.py`` flags for the GRPO comparison of ``plan``."""
    grpo = plan["grpo"]
    return ["--algo", "grpo", "--model", plan["model"], "--precision", "bf16" if plan["bf16"] else "fp32",
            "--prompts", str(grpo["prompts"]), "--group", str(grpo["group"]),
            "--max-new-tokens", str(grpo["max_new_tokens"]), "--max-length", str(grpo["max_length"]),
            "--steps", str(grpo["steps"]), "--warmup", str(grpo["warmup"]), "--repeats", "1"]


def bitsandbytes_problem(device: str) -> str | None:
    """None when bitsandbytes quantises a layer to nf4, runs it forward and backward on ``device``; else why not."""
    try:
        import bitsandbytes
        import torch

        layer = bitsandbytes.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to(device)
        inputs = torch.randn(2, 64, device=device, requires_grad=True)
        layer(inputs).sum().backward()
    except Exception as error:  # any failure means QLoRA cannot run here; the row says which
        return f"bitsandbytes does not run on {device}: {type(error).__name__}: {error}"
    return None


def model_shape(folder: Path) -> dict:
    """Parameters (all of them, counted on the meta device), layers and hidden size of the model in ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {"parameters": sum(p.numel() for p in model.parameters()), "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size}


def rows_of(comparison: str, result: dict, shape: dict, peak_tflops: float | None) -> list[dict]:
    """The plan's rows of one comparison, each with its throughput, memory and, for SFT and DPO, MFU."""
    rows = []
    for name_comparison, side, name in ROWS:
        if name_comparison != comparison or side not in result["sides"]:
            continue
        measured = result["sides"][side]
        row = {"name": name, "comparison": comparison, "side": side}
        if "skipped" in measured:
            rows.append({**row, "status": "skipped", "reason": measured["skipped"]})
            continue
        row["status"] = "ran"
        for field in ("tokens_per_s", "samples_per_s", "seconds", "peak_gpu_mib", "peak_rss_mib",
                      "rss_before_training_mib", "working_set_mib", "final_loss"):
            if field in measured:
                row[field] = measured[field]
        if comparison == "grpo":
            row["completion_tokens_per_s"] = row.pop("tokens_per_s")
        else:
            sequence = result["settings"]["max_length"]
            row["model_tflops_per_s"] = 6 * shape["parameters"] * row["tokens_per_s"] / 1e12
            row["attention_tflops_per_s"] = (
                6 * shape["layers"] * sequence * shape["hidden_size"] * row["tokens_per_s"] / 1e12
            )
            if peak_tflops:
                row["mfu"] = row["model_tflops_per_s"] / peak_tflops
        rows.append(row)
    return rows


def ratios_of(rows: list[dict]) -> dict:
    """align over TRL for each comparison, and ZeRO-3 and QLoRA over ZeRO-0 LoRA, in speed and memory."""
    by_name = {row["name"]: row for row in rows if row["status"] == "ran"}
    ratios = {}
    for label, (top, bottom) in RATIO_PAIRS.items():
        if top in by_name and bottom in by_name:
            a, b = by_name[top], by_name[bottom]
            speed = "samples_per_s" if "samples_per_s" in a else "tokens_per_s"
            ratios[label] = {key: a[field] / b[field] for key, field in (
                ("speed", speed), ("peak_gpu", "peak_gpu_mib"), ("peak_rss", "peak_rss_mib"),
                ("working_set", "working_set_mib")) if a.get(field) and b.get(field)}
    return ratios


def report(summary: dict) -> None:
    print(f"\n{summary['device']}; model {summary['model']} ({summary['shape']['parameters'] / 1e6:,.1f}M parameters)")
    print(summary["machine"])
    gpu = summary["device_kind"] == "cuda"
    memory = "peak GPU MiB" if gpu else "peak RSS MiB"
    print(f"{'':<24}{'rate':>14}{'s/step':>8}{memory:>14}{'MFU':>7}{'attn TFLOP/s':>14}")
    for row in summary["rows"]:
        if row["status"] == "skipped":
            print(f"{row['name']:<24}not run: {row['reason']}")
            continue
        rate = (f"{row['samples_per_s']:,.2f} smp/s" if "samples_per_s" in row
                else f"{row['tokens_per_s']:,.0f} tok/s")
        steps = summary["steps"][row["comparison"]]
        held = row["peak_gpu_mib"] if gpu else row["peak_rss_mib"]
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        attention = f"{row['attention_tflops_per_s']:.1f}" if "attention_tflops_per_s" in row else "-"
        print(f"{row['name']:<24}{rate:>14}{row['seconds'] / steps:>8.2f}{held:>14,.0f}{mfu:>7}{attention:>14}")
    print()
    for label, ratio in summary["ratios"].items():
        held = ratio.get("peak_gpu" if gpu else "peak_rss")
        print(f"{label:<28} speed {ratio['speed']:.2f}x  memory {held:.2f}x" if held
              else f"{label:<28} speed {ratio['speed']:.2f}x")
    goal = train_vs_trl.GOAL
    print(f"goal for SFT and DPO: speed >= {goal['speed']:.1f}x TRL, memory <= {goal['memory']:.1f}x; "
          f"finished in {summary['elapsed_s']:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(PLANS), default="1b", help="1b on a GPU; tiny: the dry run on the CPU")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's bf16 dense peak (default 989, an H100/H200)")
    parser.add_argument("--json", type=Path, help="write the rows, ratios and settings here (after each comparison)")
    args = parser.parse_args()
    started = time.perf_counter()
    import torch

    plan = PLANS[args.size]
    if args.size != "tiny" and not torch.cuda.is_available():
        parser.error(f"--size {args.size} needs a CUDA GPU; --size tiny is the CPU dry run")
    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ["DS_ACCELERATOR"] = device_kind
    peak_tflops = args.peak_tflops or (H200_BF16_DENSE_TFLOPS if device_kind == "cuda" else None)
    _, folder = train_vs_trl.model_folder(plan["model"])
    shape = model_shape(folder)
    summary = {
        "size": args.size, "model": plan["model"], "shape": shape, "plan": plan, "device_kind": device_kind,
        "device": torch.cuda.get_device_name(0) if device_kind == "cuda" else "CPU", "machine": harness.machine(),
        "peak_tflops": peak_tflops, "rows": [], "ratios": {}, "results": {},
        "steps": {c: plan[c]["steps"] for c in ("dpo", "sft", "grpo", "zero3", "qlora")},
    }
    qlora_problem = bitsandbytes_problem(device_kind)
    for comparison in ("dpo", "sft", "grpo", "zero3", "qlora"):
        print(f"[{time.perf_counter() - started:5.0f} s] {comparison}", flush=True)
        if comparison == "qlora" and qlora_problem:
            result = {"sides": {"align": {"skipped": qlora_problem}}, "settings": {}}
        elif comparison == "grpo":
            result = rl_vs_trl.compare(rl_vs_trl.parse_args(grpo_argv(plan)))
        else:
            result = train_vs_trl.compare(train_vs_trl.parse_args(train_argv(plan, comparison)))
        summary["results"][comparison] = result
        summary["rows"] += rows_of(comparison, result, shape, peak_tflops)
        summary["ratios"] = ratios_of(summary["rows"])
        summary["elapsed_s"] = time.perf_counter() - started
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
    report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
