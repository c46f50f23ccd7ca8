"""align's DPO stage against TRL's ``DPOTrainer``: tokens per second, peak memory, final loss.

Both sides train the same tiny Llama with the same LoRA (r=8, alpha 16, dropout 0, all linear layers),
on the same preference pairs in the same order (8 pairs a step, max length 128), with the same
optimizer settings, precision and thread count, and no gradient checkpointing. Each side runs in its
own child process, one after the other, so its peak RSS is its own.

Batches are identical on both sides: this process works out align's batch order (a pure function of
the seed and the step) and hands TRL the rows already in that order with a sequential sampler. Tokens
per second is then counted the same way for both: the non-pad tokens of the chosen and rejected
sequences of the timed steps, computed from the data, divided by the wall time of those steps. The
time of a step is measured end to end (end of the previous step to end of this one), so it includes
collation, the reference pass, logging and the optimizer step on both sides; the first ``--warmup``
steps are left out.

Run from the repository root:

    .venv/bin/python bench/dpo_vs_trl.py              # fp32, live reference
    .venv/bin/python bench/dpo_vs_trl.py --bf16
    .venv/bin/python bench/dpo_vs_trl.py --precompute # reference log-probs computed before training
    .venv/bin/python bench/dpo_vs_trl.py --quick      # a few steps, to check that both sides run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

REPO = Path(__file__).resolve().parent.parent
THREADS = 2
SEED = 42
PAIRS_PER_STEP = 8
MAX_LENGTH = 128
LEARNING_RATE = 5e-5
BETA = 0.1
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
# The model used when align.tiny is not available: the size the TRL reference numbers were taken on.
FALLBACK_MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4}
GENERATED_PAIRS = 512
# TRL 1.16 on this machine (fp32, live reference), measured before this script existed.
TRL_REFERENCE = {"tokens_per_s": 3276, "tokens_per_s_precomputed": 3650, "peak_rss_mib": 675}
GOAL = {"speed": 2.0, "memory": 0.7}


# --- what both sides train on ---------------------------------------------------------------------


def model_folder() -> tuple[str, Path]:
    """The base model as a spec names it, and its local folder: ``builtin:tiny`` when align has it."""
    try:
        from align.tiny import build_tiny
    except ImportError:
        return _fallback_model()
    return "builtin:tiny", Path(build_tiny())


def _fallback_model() -> tuple[str, Path]:
    """A random Llama of ``FALLBACK_MODEL``'s size with the test tokenizer, built once under the cache."""
    from align.paths import cache_dir

    folder = cache_dir() / "bench" / "llama-h{hidden_size}-i{intermediate_size}-l{num_hidden_layers}".format(
        **FALLBACK_MODEL
    )
    if (folder / "config.json").is_file():
        return str(folder), folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from data_helpers import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=FALLBACK_MODEL["num_attention_heads"],
        max_position_embeddings=2 * MAX_LENGTH,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **FALLBACK_MODEL,
    )
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    LlamaForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return str(folder), folder


def preference_file(work: Path) -> Path:
    """``builtin:parity/prefs`` when align has built-in tasks, else generated parity pairs."""
    try:
        from align.task import materialize
    except ImportError:
        return _generated_pairs(work / "prefs.jsonl")
    return Path(materialize("builtin:parity/prefs"))


def _generated_pairs(path: Path) -> Path:
    """Arithmetic questions; the chosen answer is right and explains itself, the rejected one is off by a little."""
    rng = random.Random(0)
    rows = []
    for _ in range(GENERATED_PAIRS):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        steps = " ".join(f"Add {x}." for x in rng.sample([a, b], 2)[: rng.randint(0, 2)])
        rows.append(
            {
                "prompt": f"What is {a} plus {b}? Answer with the sum.",
                "chosen": f"{steps} {a} + {b} = {a + b}. The answer is {a + b}.".strip(),
                "rejected": f"{a} + {b} = {wrong}. The answer is {wrong}.",
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def job_spec(model: str, data: Path, steps: int, bf16: bool, precompute: bool) -> dict:
    """The one-stage align job the benchmark runs."""
    return {
        "name": "bench-dpo",
        "base_model": model,
        "adapter": {"type": "lora", **LORA},
        "deepspeed": {"zero_stage": 0, "precision": "bf16" if bf16 else "fp32", "gradient_checkpointing": False},
        "resources": {"num_workers": 1, "cpus_per_worker": THREADS},
        "stages": [
            {
                "type": "dpo",
                "data": {"path": str(data)},
                "max_steps": steps,
                "batch_size": PAIRS_PER_STEP,
                "max_length": MAX_LENGTH,
                "lr": LEARNING_RATE,
                "lr_scheduler": "cosine",
                "beta": BETA,
                "reference": "precomputed" if precompute else "live",
                "checkpoint_every": None,
                "log_every": 1,
                "seed": SEED,
            }
        ],
    }


def batch_plan(spec: dict) -> dict:
    """The rows of every step in align's order, as TRL conversations, and the tokens each step holds.

    align shuffles the rows with the stage seed, tokenises them and picks each step's rows with
    ``micro_batch_indices``; the same is done here, and the tokenised rows are checked against what
    align's own data loading gives.
    """
    from align.data import load, tokenize
    from align.data.order import micro_batch_indices
    from align.data.stage_data import load_stage_data
    from align.engine.dist import Rank
    from align.models.load import load_tokenizer, resolve_base_model
    from align.spec import parse_spec

    job = parse_spec(spec)
    stage = job.stages[0]
    tokenizer = load_tokenizer(resolve_base_model(job.base_model))
    loaded = load_stage_data(stage, "preference", tokenizer)

    raw = load.load_rows(stage.data.path)
    fmt = load.detect_format(raw, "preference", stage.data.path)
    raw_rows = list(raw)
    random.Random(stage.seed).shuffle(raw_rows)
    train, conversations = [], []
    for row in raw_rows:
        features = tokenize.tokenize_preference(row, fmt, tokenizer, stage.max_length, stage.max_prompt_length)
        if features is not None:
            train.append(features)
            conversations.append(tokenize.preference_conversations(row, fmt))
    if train != loaded.train:
        raise RuntimeError("the benchmark's tokenised rows differ from align's; the batch plan would not match")

    rank = Rank(0, 1, 0)
    rows, step_tokens, step_padded = [], [], []
    for step in range(stage.max_steps):
        (indices,) = micro_batch_indices(len(train), step, stage.batch_size, 1, rank, stage.seed)
        lengths = [len(train[i][key]) for key in ("chosen_input_ids", "rejected_input_ids") for i in indices]
        step_tokens.append(sum(lengths))
        step_padded.append(len(lengths) * max(lengths))
        for i in indices:
            prompt, chosen, rejected = conversations[i]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "expected_chosen_ids": train[i]["chosen_input_ids"],
                    "expected_rejected_ids": train[i]["rejected_input_ids"],
                }
            )
    return {"rows": rows, "step_tokens": step_tokens, "step_padded_tokens": step_padded, "pairs": len(train)}


# --- the two sides, each in its own process -------------------------------------------------------


def run_align(config: dict) -> dict:
    """align's DPO stage through ``run_job``; step times are the metrics records' timestamps."""
    from align.runner import run_job
    from align.spec import parse_spec

    work = Path(config["work"])
    run_job(parse_spec(config["spec"]), work_root=work / "runs", artifact_root=str(work / "artifacts"))
    records = [json.loads(line) for line in (work / "runs" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    warmup, total = config["warmup"], config["steps"]
    return {
        "seconds": steps[total]["time"] - steps[warmup]["time"],
        "step_ends": [steps[s]["time"] for s in range(1, total + 1)],
        "final_loss": steps[total]["loss"],
        "own_tokens_per_s": [steps[s]["tokens_per_s"] for s in range(warmup + 1, total + 1)],
    }


def run_trl(config: dict) -> dict:
    """TRL's DPOTrainer on the planned rows, read in order; a callback stamps the end of each step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(THREADS)
    folder, work, bf16 = config["model_folder"], Path(config["work"]), config["bf16"]
    plan = json.loads(Path(config["plan"]).read_text())
    expected = [(r.pop("expected_chosen_ids"), r.pop("expected_rejected_ids")) for r in plan["rows"]]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if bf16 else torch.float32)
    args = DPOConfig(
        output_dir=str(work / "trl"),
        max_steps=config["steps"],
        per_device_train_batch_size=PAIRS_PER_STEP,
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        max_length=MAX_LENGTH,
        bf16=bf16,
        gradient_checkpointing=False,
        precompute_ref_log_probs=config["precompute"],
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=SEED,
    )
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(plan["rows"]),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[clock],
    )
    prepared = trainer.train_dataset
    mismatched = sum(
        row["prompt_ids"] + row["chosen_ids"] != chosen[:MAX_LENGTH]
        or row["prompt_ids"] + row["rejected_ids"] != rejected[:MAX_LENGTH]
        for row, (chosen, rejected) in zip(prepared, expected)
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    warmup, total = config["warmup"], config["steps"]
    return {
        "seconds": clock.ends[total - 1] - clock.ends[warmup - 1],
        "step_ends": clock.ends,
        "final_loss": losses[-1],
        "rows_tokenised_differently": mismatched,
    }


def run_side(side: str, config: dict, work: Path) -> dict:
    return harness.run_side(__file__, side, config, work, THREADS)


def child_main(side: str, config_file: str, result_file: str) -> None:
    config = json.loads(Path(config_file).read_text())
    result = (run_align if side == "align" else run_trl)(config)
    Path(result_file).write_text(json.dumps(result))


# --- the comparison -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and left out of the timing")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 on both sides (default fp32)")
    parser.add_argument("--precompute", action="store_true", help="reference log-probs computed before training")
    parser.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up: a smoke check")
    parser.add_argument("--only", choices=["align", "trl"], help="run one side only")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, metrics) and print its path")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    os.environ.update({k: v for k, v in harness.child_environment(THREADS).items() if k != "PYTHONPATH"})
    sys.path.insert(0, str(REPO))
    total = args.warmup + args.steps
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    model, folder = model_folder()
    spec = job_spec(model, preference_file(work), total, args.bf16, args.precompute)
    plan = batch_plan(spec)
    (work / "plan.json").write_text(json.dumps(plan))
    timed_tokens = sum(plan["step_tokens"][args.warmup :])
    timed_padded = sum(plan["step_padded_tokens"][args.warmup :])

    config = {
        "spec": spec, "model_folder": str(folder), "plan": str(work / "plan.json"), "steps": total,
        "warmup": args.warmup, "bf16": args.bf16, "precompute": args.precompute,
    }
    results = {}
    for side in ("trl", "align"):
        if args.only in (None, side):
            side_work = work / side
            side_work.mkdir()
            started = time.perf_counter()
            results[side] = run_side(side, {**config, "work": str(side_work)}, work)
            results[side]["wall_s"] = time.perf_counter() - started
            results[side]["tokens_per_s"] = timed_tokens / results[side]["seconds"]

    import trl

    reference = "precomputed" if args.precompute else "live"
    print(
        f"\nDPO, {'bf16' if args.bf16 else 'fp32'}, {reference} reference; model {model}; "
        f"LoRA r={LORA['r']} alpha={LORA['alpha']:g} all-linear; {PAIRS_PER_STEP} pairs/step, max length "
        f"{MAX_LENGTH}; {args.steps} timed steps after {args.warmup} warm-up; {THREADS} threads"
    )
    print(
        f"data: {plan['pairs']} pairs; timed steps hold {timed_tokens:,} non-pad tokens "
        f"({timed_tokens / timed_padded:.0%} of the padded batches)\n"
    )
    print(harness.machine())
    names = {"trl": f"TRL {trl.__version__}", "align": "align"}
    print(f"{'':<12}{'tokens/s':>10}{'peak RSS MiB':>14}{'final loss':>12}{'run s':>8}")
    for side, result in results.items():
        print(
            f"{names[side]:<12}{result['tokens_per_s']:>10,.0f}{result['peak_rss_mib']:>14,.0f}"
            f"{result['final_loss']:>12.4f}{result['wall_s']:>8.1f}"
        )
    if len(results) == 2:
        speed = results["align"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
        memory = results["align"]["peak_rss_mib"] / results["trl"]["peak_rss_mib"]
        print(f"{'align/TRL':<12}{speed:>9.2f}x{memory:>13.2f}x")
        speed, memory = f">={GOAL['speed']:.1f}x", f"<={GOAL['memory']:.1f}x"
        print(f"{'goal':<12}{speed:>10}{memory:>14}")
    if "trl" in results and results["trl"]["rows_tokenised_differently"]:
        print(f"\nwarning: TRL tokenised {results['trl']['rows_tokenised_differently']} rows differently from align")
    if "align" in results:
        own = results["align"]["own_tokens_per_s"]
        mean = sum(own) / len(own)
        print(f"\nalign's own tokens_per_s over the timed steps (mean of per-step readings): {mean:,.0f}")
    earlier = TRL_REFERENCE["tokens_per_s_precomputed" if args.precompute else "tokens_per_s"]
    print(f"TRL measured earlier on this machine (fp32): {earlier:,} tokens/s, ~{TRL_REFERENCE['peak_rss_mib']} MiB")
    if args.keep:
        print(f"work folder: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:])
    else:
        sys.exit(main())
