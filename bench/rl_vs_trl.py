"""align's GRPO/RLOO stage against TRL's ``GRPOTrainer``/``RLOOTrainer``: samples per second, peak memory.

Both sides train the built-in tiny Llama (``builtin:tiny``; ``--model`` takes another) with the same
LoRA (by default r=8, alpha 16, dropout 0, all linear layers) on the built-in parity prompts
(``builtin:parity/prompts``), rendered with the model's chat template, and score completions with the
same reward function (``align.task.exact_answer_reward``; TRL gets it wrapped in its reward-function
signature). Each optimizer step takes ``--prompts`` prompts, samples ``--group`` completions of each (up to
``--max-new-tokens`` tokens, temperature 1, top-p 1, no top-k), scores them, and makes one
optimisation pass over them (TRL ``num_iterations=1``, gradient accumulation 1) with the same KL
coefficient, clip range, learning rate and schedule, optimizer (``torch.optim.AdamW``), precision and
thread count; dropout is off and gradient checkpointing is off on both sides; TRL generates with
``transformers`` ``generate``, as align does (no vLLM).

The prompts of every step are the same on both sides: this process works out align's batch order (a
pure function of the seed and the step) and hands TRL the prompts already in that order, unshuffled.
The completions themselves are sampled, so they differ between the sides; their lengths are counted
and reported.

A sample is one completion, generated and trained on; samples per second is ``prompts x group x
timed steps`` over the wall time of the timed steps. The time of a step is measured end to end (end
of the previous step to end of this one), so it includes generation, scoring, the reference pass, the
policy pass, the backward pass, the optimizer step and logging on both sides; the first ``--warmup``
steps are left out. Completion tokens per second counts the generated tokens (EOS included) of the
timed steps as each side logs them. Each side runs in its own child process, one after the other, so
its peak RSS is its own. The sides run ``--repeats`` times each (2 by default), alternating, and the
fastest run of each side is reported (its peak RSS with it), since other work on the same cores slows
whichever side is running at the time; the 1-minute load average before and after is printed.

What still differs, by design of each library: align encodes each prompt once per group, in sampling
and in the reference and policy passes (a KV cache repeated for the group's completions), where TRL
runs every completion with its own copy of the prompt; TRL scores the completion positions only,
through the model's fused LM-head path (``fused_lm_head=True``), and also computes the entropy;
both put the summed k1 KL into the reward for RLOO (align: ``kl_penalty: reward``), but TRL's
``RLOOTrainer`` runs one more no-grad policy pass per step for it, where align reads it off the
policy pass it trains with (one optimisation pass per batch makes the two the same).
In bf16, align trains the adapter in bf16 with fp32 master weights (DeepSpeed); TRL gets the base
model loaded in bf16 and autocasts, keeping the adapter in fp32. The starting model answers the chat
prompts badly, so most groups score all zero (no advantage signal); the work per step is the same
either way.

Run from the repository root:

    .venv/bin/python bench/rl_vs_trl.py                      # GRPO, fp32, 8 prompts x 8 samples, 16 new tokens
    .venv/bin/python bench/rl_vs_trl.py --precision bf16
    .venv/bin/python bench/rl_vs_trl.py --algo rloo          # against TRL's RLOOTrainer
    .venv/bin/python bench/rl_vs_trl.py --prompts 16 --group 4 --max-new-tokens 32 --steps 20
    .venv/bin/python bench/rl_vs_trl.py --repeats 1          # each side once
    .venv/bin/python bench/rl_vs_trl.py --quick              # 2 timed steps after 1 warm-up, once: a smoke check
    .venv/bin/python bench/rl_vs_trl.py --json result.json   # also write the result as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SEED = 42
PROMPTS = "builtin:parity/prompts"
REWARD = "exact_answer"
CLIP_EPS = 0.2
LR_SCHEDULER = "cosine"
GOAL_SPEED = 1.5


def lora_settings(r: int) -> dict:
    return {"r": r, "alpha": float(2 * r), "dropout": 0.0, "target_modules": "all-linear"}


# --- what both sides train on ---------------------------------------------------------------------


def job_spec(args: argparse.Namespace, model: str, total_steps: int) -> dict:
    """The one-stage align job the benchmark runs."""
    return {
        "name": f"bench-{args.algo}",
        "base_model": model,
        "adapter": {"type": "lora", **lora_settings(args.lora_r)},
        "deepspeed": {"zero_stage": 0, "precision": args.precision, "gradient_checkpointing": False},
        "resources": {"num_workers": 1, "cpus_per_worker": args.threads,
                      "gpus_per_worker": 1 if args.device == "cuda" else 0},
        "stages": [
            {
                "type": args.algo,
                "data": {"path": PROMPTS},
                "reward": REWARD,
                "group_size": args.group,
                "batch_size": args.prompts,
                "gradient_accumulation_steps": 1,
                "max_new_tokens": args.max_new_tokens,
                "max_length": args.max_length,
                "temperature": 1.0,
                "top_p": 1.0,
                "clip_eps": CLIP_EPS,
                "kl_coef": args.kl_coef,
                # TRL's RLOOTrainer takes the summed k1 KL off the reward; its GRPOTrainer adds k3 to the loss.
                "kl_penalty": "reward" if args.algo == "rloo" else "loss",
                "max_steps": total_steps,
                "lr": args.lr,
                "lr_scheduler": LR_SCHEDULER,
                "eval_exact_match": False,
                "checkpoint_every": None,
                "log_every": 1,
                "seed": SEED,
            }
        ],
    }


def prompt_plan(spec: dict) -> dict:
    """The prompts of every step in align's order, as conversations, with their token ids.

    align shuffles and tokenises the rows in ``load_stage_data`` and picks each step's rows with
    ``micro_batch_indices``; the same calls are made here. Each prompt's ids are also rendered
    directly with the chat template (as TRL renders them) and must match align's, uncut.
    """
    from align.data.order import micro_batch_indices
    from align.data.stage_data import load_stage_data
    from align.engine.dist import Rank
    from align.models.load import load_tokenizer, resolve_base_model
    from align.spec import parse_spec

    job = parse_spec(spec)
    stage = job.stages[0]
    tokenizer = load_tokenizer(resolve_base_model(job.base_model))
    train = load_stage_data(stage, "prompt", tokenizer).train

    rank = Rank(0, 1, 0)
    rows, expected_ids = [], []
    for step in range(stage.max_steps):
        (indices,) = micro_batch_indices(len(train), step, stage.batch_size, 1, rank, stage.seed)
        for i in indices:
            conversation, ids = train[i]["prompt"], list(train[i]["prompt_input_ids"])
            rendered = tokenizer.apply_chat_template(
                conversation, tokenize=True, return_dict=True, add_generation_prompt=True
            )["input_ids"]
            if list(rendered) != ids:
                raise RuntimeError(f"align's prompt ids differ from the chat template's for {conversation!r}")
            rows.append({"prompt": conversation})
            expected_ids.append(ids)
    return {"rows": rows, "prompt_ids": expected_ids, "prompts": len(train)}


# --- the two sides, each in its own process -------------------------------------------------------


def run_align(config: dict) -> dict:
    """align's GRPO/RLOO stage through ``run_job``; step times are the metrics records' timestamps."""
    from align.runner import run_job
    from align.spec import parse_spec

    work = Path(config["work"])
    job = parse_spec(config["spec"])
    run_job(job, work_root=work / "runs", artifact_root=str(work / "artifacts"))
    metrics_file = work / "runs" / job.stage_names()[0] / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    warmup, total, samples = config["warmup"], config["steps"], config["samples_per_step"]
    timed = range(warmup + 1, total + 1)
    return {
        "seconds": steps[total]["time"] - steps[warmup]["time"],
        "completion_tokens": sum(steps[s]["response_length"] * samples for s in timed),
        "reward_mean": sum(steps[s]["reward_mean"] for s in timed) / len(timed),
        "kl": steps[total]["kl"],
        "own_samples_per_s": [steps[s]["samples_per_s"] for s in timed],
    }


def run_trl(config: dict) -> dict:
    """TRL's trainer on the planned prompts, read in order; a callback stamps the end of each step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from align.task import exact_answer_reward

    threads, algo, bf16 = config["threads"], config["algo"], config["precision"] == "bf16"
    torch.set_num_threads(threads)
    stage, adapter = config["spec"]["stages"][0], config["spec"]["adapter"]
    folder, work = config["model_folder"], Path(config["work"])
    plan = json.loads(Path(config["plan"]).read_text())
    group, prompts_per_step = stage["group_size"], stage["batch_size"]

    def exact_answer(prompts, completions, **kwargs) -> list[float]:
        """``exact_answer_reward`` on the last user turn and the assistant reply, in TRL's signature."""
        scores = []
        for prompt, completion in zip(prompts, completions):
            question = [m["content"] for m in prompt if m["role"] == "user"][-1]
            scores.append(exact_answer_reward(question, completion[-1]["content"]))
        return scores

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    common = {
        "output_dir": str(work / "trl"),
        "max_steps": config["steps"],
        "per_device_train_batch_size": prompts_per_step * group,  # TRL counts completions, not prompts
        "gradient_accumulation_steps": 1,
        "num_generations": group,
        "num_iterations": 1,
        "steps_per_generation": 1,
        "max_completion_length": stage["max_new_tokens"],
        "temperature": stage["temperature"],
        "top_p": stage["top_p"],
        "top_k": 0,
        "min_p": None,
        "repetition_penalty": 1.0,
        "use_vllm": False,
        "beta": stage["kl_coef"],
        "epsilon": stage["clip_eps"],
        "learning_rate": stage["lr"],
        "lr_scheduler_type": stage["lr_scheduler"],
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "bf16": bf16,
        "gradient_checkpointing": False,
        "disable_dropout": True,
        "shuffle_dataset": False,
        "mask_truncated_completions": False,
        "log_completions": False,
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "seed": SEED,
    }
    if algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        # align's GRPO: advantages whitened within the group, k3 KL per token in the loss, the loss
        # summed over tokens and divided by the step's token count (DAPO's normalisation).
        args = Config(**common, loss_type="dapo", scale_rewards="group")
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

        args = Config(**common, normalize_advantages=False)

    clock = StepClock()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if bf16 else torch.float32)
    lora = LoraConfig(
        r=adapter["r"],
        lora_alpha=adapter["alpha"],
        lora_dropout=adapter["dropout"],
        target_modules=adapter["target_modules"],
        task_type="CAUSAL_LM",
    )
    trainer = Trainer(
        model=model,
        reward_funcs=[exact_answer],
        args=args,
        train_dataset=Dataset.from_list(plan["rows"]),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[clock],
    )

    # Check that each step's generation batch holds the planned prompts, each `group` times.
    seen = []
    tokenize_prompts = trainer._tokenize_prompts

    def recording_tokenize_prompts(prompts):
        prompt_ids, *rest = tokenize_prompts(prompts)
        seen.append(sorted(tuple(ids) for ids in prompt_ids))
        return (prompt_ids, *rest)

    trainer._tokenize_prompts = recording_tokenize_prompts
    trainer.train()

    expected = plan["prompt_ids"]
    mismatched_steps = sum(
        got != sorted(tuple(ids) for ids in expected[s * prompts_per_step : (s + 1) * prompts_per_step]
                      for _ in range(group))
        for s, got in enumerate(seen)
    )
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "completions/mean_length" in entry}
    warmup, total, samples = config["warmup"], config["steps"], config["samples_per_step"]
    timed = range(warmup + 1, total + 1)
    return {
        "seconds": clock.ends[total - 1] - clock.ends[warmup - 1],
        "completion_tokens": sum(logs[s]["completions/mean_length"] * samples for s in timed),
        "reward_mean": sum(logs[s]["reward"] for s in timed) / len(timed),
        "kl": logs[total].get("kl", float("nan")),
        "generation_calls": len(seen),
        "steps_with_other_prompts": mismatched_steps,
    }


def run_side(side: str, config: dict, work: Path) -> dict:
    return harness.run_side(__file__, side, config, work, config["threads"])


# --- the comparison -------------------------------------------------------------------------------


def compare(args: argparse.Namespace) -> dict:
    """Run the sides ``args.sides`` asks for, ``args.repeats`` times each, and return the result (what
    ``--json`` writes): the fastest run of each side, every run's samples/s, and the ratios."""
    os.environ.update({k: v for k, v in harness.child_environment(args.threads).items() if k != "PYTHONPATH"})
    sys.path.insert(0, str(REPO))
    from train_vs_trl import model_folder

    total = args.warmup + args.steps
    samples_per_step = args.prompts * args.group
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.algo}-"))
    model, folder = model_folder(args.model)
    spec = job_spec(args, model, total)
    plan = prompt_plan(spec)
    (work / "plan.json").write_text(json.dumps(plan))
    timed_samples = samples_per_step * args.steps

    config = {
        "spec": spec, "model_folder": str(folder), "plan": str(work / "plan.json"), "steps": total,
        "warmup": args.warmup, "precision": args.precision, "algo": args.algo, "threads": args.threads,
        "samples_per_step": samples_per_step,
    }
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for side in ("trl", "align"):
            if side in args.sides:
                side_work = work / f"{side}-{repeat}"
                side_work.mkdir()
                started = time.perf_counter()
                result = run_side(side, {**config, "work": str(side_work)}, side_work)
                result["wall_s"] = time.perf_counter() - started
                result["samples_per_s"] = timed_samples / result["seconds"]
                result["tokens_per_s"] = result["completion_tokens"] / result["seconds"]
                result["working_set_mib"] = result["peak_rss_mib"] - result["rss_before_training_mib"]
                runs.setdefault(side, []).append(result)
    load_after = os.getloadavg()[0]
    sides = {side: max(side_runs, key=lambda r: r["samples_per_s"]) for side, side_runs in runs.items()}
    ratios = {}
    if len(sides) == 2:
        align_side, trl_side = sides["align"], sides["trl"]
        ratios = {
            key: align_side[field] / trl_side[field]
            for key, field in (("speed", "samples_per_s"), ("tokens", "tokens_per_s"), ("peak_rss", "peak_rss_mib"),
                               ("working_set", "working_set_mib"), ("peak_gpu", "peak_gpu_mib"))
            if align_side.get(field) and trl_side.get(field)
        }
    if args.keep:
        print(f"work folder: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    import torch
    import trl

    return {
        "algo": args.algo, "model": args.model, "model_folder": str(folder), "machine": harness.machine(),
        "torch": torch.__version__, "trl": trl.__version__,
        "settings": {"prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
                     "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
                     "precision": args.precision, "threads": args.threads, "lora": lora_settings(args.lora_r),
                     "kl_coef": args.kl_coef, "lr": args.lr, "repeats": args.repeats},
        "data": {"prompts": plan["prompts"], "timed_samples": timed_samples},
        "sides": sides, "runs": {side: [r["samples_per_s"] for r in side_runs] for side, side_runs in runs.items()},
        "ratios": ratios, "goal": {"speed": GOAL_SPEED}, "load_average": [load_before, load_after],
        "steps_total": total,
    }


def report(result: dict) -> None:
    settings, timed_samples = result["settings"], result["data"]["timed_samples"]
    lora = settings["lora"]
    trainer_name = "GRPOTrainer" if result["algo"] == "grpo" else "RLOOTrainer"
    print(
        f"\n{result['algo'].upper()} vs TRL {trainer_name}, {settings['precision']}; model {result['model']}; "
        f"LoRA r={lora['r']} alpha={lora['alpha']:g} all-linear; {settings['prompts']} prompts x "
        f"{settings['group']} samples/step, {settings['max_new_tokens']} new tokens max; KL coef "
        f"{settings['kl_coef']:g}; {settings['steps']} timed steps after {settings['warmup']} warm-up; "
        f"{settings['threads']} threads"
    )
    print(f"data: {result['data']['prompts']} prompts ({PROMPTS}); reward {REWARD}; timed steps hold "
          f"{timed_samples} samples\n")
    print(result["machine"])
    names = {"trl": f"TRL {result['trl']}", "align": "align"}
    print(f"{'':<12}{'samples/s':>10}{'tokens/s':>10}{'peak RSS MiB':>14}{'len/sample':>12}{'reward':>8}{'run s':>8}")
    for side, side_result in result["sides"].items():
        print(
            f"{names[side]:<12}{side_result['samples_per_s']:>10.2f}{side_result['tokens_per_s']:>10.1f}"
            f"{side_result['peak_rss_mib']:>14,.0f}{side_result['completion_tokens'] / timed_samples:>12.2f}"
            f"{side_result['reward_mean']:>8.3f}{side_result['wall_s']:>8.1f}"
        )
    ratios = result["ratios"]
    if ratios:
        print(f"{'align/TRL':<12}{ratios['speed']:>9.2f}x{ratios['tokens']:>9.2f}x{ratios['peak_rss']:>13.2f}x")
        met = "met" if ratios["speed"] >= GOAL_SPEED else "not met"
        print(f"\ngoal: >= {GOAL_SPEED:.1f}x TRL samples/s ({met})")
    print("tokens/s counts generated completion tokens (EOS included); reward is the mean over the timed steps")
    if settings["repeats"] > 1:
        for side, listed in result["runs"].items():
            print(f"{names[side]} samples/s of each run (the fastest is shown above): "
                  f"{', '.join(f'{x:.2f}' for x in listed)}")
    before, after = result["load_average"]
    print(f"load average (1 min) before / after: {before:.2f} / {after:.2f} on {os.cpu_count()} CPUs")
    if "trl" in result["sides"]:
        trl_result, total = result["sides"]["trl"], result["steps_total"]
        if trl_result["generation_calls"] != total or trl_result["steps_with_other_prompts"]:
            print(
                f"warning: TRL generated {trl_result['generation_calls']} times for {total} steps; "
                f"{trl_result['steps_with_other_prompts']} steps held prompts other than align's"
            )
    if "align" in result["sides"]:
        own = result["sides"]["align"]["own_samples_per_s"]
        print(f"align's own samples_per_s over the timed steps (mean of per-step readings): {sum(own) / len(own):.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", choices=["grpo", "rloo"], default="grpo", help="align stage and TRL trainer")
    parser.add_argument("--model", default="builtin:tiny",
                        help="builtin:tiny, a size of bench/train_vs_trl.py (small, 1b), or a model folder")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="precision on both sides")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    parser.add_argument("--group", type=int, default=8, help="completions sampled per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="most tokens generated per completion")
    parser.add_argument("--max-length", type=int, default=128, help="longest prompt plus completion")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and left out of the timing")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha is twice the rank)")
    parser.add_argument("--kl-coef", type=float, default=0.04, help="KL coefficient (TRL's beta)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (cosine decay, no warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on each side")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="2 timed steps after 1 warm-up, once")
    parser.add_argument("--only", choices=["align", "trl"], help="run one side only")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, metrics); print its path")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 2, 1, 1
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.group < 2 or min(args.prompts, args.max_new_tokens, args.threads, args.repeats) < 1:
        parser.error("--group must be at least 2; --prompts, --max-new-tokens, --threads, --repeats at least 1")
    if args.max_new_tokens >= args.max_length:
        parser.error(f"--max-new-tokens must be below --max-length ({args.max_length})")
    args.sides = [args.only] if args.only else ["trl", "align"]
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main() -> int:
    args = parse_args()
    result = compare(args)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        harness.child_main({"align": run_align, "trl": run_trl})
    else:
        sys.exit(main())
