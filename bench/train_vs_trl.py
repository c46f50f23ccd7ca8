"""align's SFT and DPO stages against TRL's ``SFTTrainer`` and ``DPOTrainer``: tokens per second, peak memory.

Both sides train the same model with the same LoRA (r=8, alpha 16, dropout 0, all linear layers), on the
same rows in the same order, with the same batch, optimizer settings, precision and thread count, and no
gradient checkpointing. align runs its stage as a user would, through ``align.runner.run_job`` with a job
spec, with its default ``padding_free: true`` (packed micro-batches); ``--sides`` may add ``align_padded``,
the same stage with ``padding_free: false``. Each side runs in its own child process, one after the other,
so its peak memory is its own.

TRL runs twice: with its defaults for the data side (padded batches), and with its padding-free option
where it has one. TRL 1.16's ``SFTTrainer(padding_free=True)`` flattens each batch into one row with
``position_ids`` restarting at every sequence and no attention mask; it is given the same rows
already tokenised (as its error message asks, since it does not truncate in that mode). Its
``DPOTrainer`` warns and falls back to padding, so that row is reported as not run, with TRL's
words. On a model without FlashAttention (here: sdpa), transformers builds a block-diagonal causal
mask from the restarting positions; the padding-free run checks that, by running its first training
batch again, flattened and one sequence at a time, and reports the largest difference.

The model is by default a random Llama with a 32,000-entry vocabulary (hidden 256, 4 layers, 4 heads,
intermediate 688: ``--model small``; ``--model 1b`` is TinyLlama's shape), so the LM head and its
log-softmax cost what they cost on real models, with the tokenizer of ``builtin:tiny``; it is built once
under the cache. ``--model builtin:tiny`` (vocabulary 1,024) or a model folder also work.

The rows are generated with a fixed seed from readable English (``align.english``):

- ``--lengths longtail`` (default): prompt and response lengths in tokens drawn from log-normals clipped
  like real preference data: prompts median 150 with a tail to 1,024, responses median 250 with a tail
  to 1,536 (both scaled down when ``--max-length`` is below 2,560). DPO's chosen and rejected responses
  are drawn separately; SFT takes the prompt and the chosen one. The realised percentiles are printed.
- ``--lengths full``: every sequence is ``--max-length`` tokens long (rows are generated longer and cut).

Batches are identical on both sides: this process works out align's batch order (a pure function of
the seed and the step) and hands TRL the rows already in that order with a sequential sampler. Tokens
per second is counted the same way for every side: the non-pad tokens of the timed steps (chosen and
rejected for DPO), from the data, over the wall time of those steps. The time of a step is measured end
to end (end of the previous step to end of this one), so it includes collation, the reference pass,
logging and the optimizer step; the first ``--warmup`` steps are left out. Memory is the peak RSS of
each side's process (``wait4``) and that peak minus the RSS when the first training step began (the
training working set: on a small model the fixed Python and torch baseline dominates the peak), and on a
GPU ``torch.cuda.max_memory_allocated``.

Run from the repository root:

    .venv/bin/python bench/train_vs_trl.py --stage dpo                   # long-tail lengths, fp32
    .venv/bin/python bench/train_vs_trl.py --stage sft --lengths full
    .venv/bin/python bench/train_vs_trl.py --stage dpo --quick           # a few steps, to check that it runs
    .venv/bin/python bench/train_vs_trl.py --stage dpo --json result.json
    .venv/bin/python bench/train_vs_trl.py --stage dpo --sides trl,align_padded,align --repeats 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

REPO = harness.REPO
SEED = 42
BETA = 0.1
LEARNING_RATE = {"sft": 2e-4, "dpo": 5e-5}
DEFAULT_BATCH = {"sft": 8, "dpo": 4}  # SFT rows or DPO pairs per step: the same sequences per step
DEFAULT_MAX_LENGTH = {"longtail": 2048, "full": 512}
GOAL = {"speed": 2.0, "memory": 0.6}
VOCAB_SIZE = 32_000
MODEL_SIZES = {
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
}
MAX_POSITIONS = 4096
# Long-tail token lengths: log-normal (median, sigma) clipped to [MIN_TOKENS, cap]; sigma puts p99 near the cap.
LONGTAIL = {"prompt": (150, 0.8, 1024), "response": (250, 0.75, 1536)}
MIN_TOKENS = 8
FULL_PROMPT_FRACTION = 0.25
SIDES = ("trl", "trl_padding_free", "align_padded", "align")
DEFAULT_SIDES = ("trl", "trl_padding_free", "align")
SIDE_NAMES = {"align": "align", "align_padded": "align padded", "trl": "TRL", "trl_padding_free": "TRL padding-free"}


def lora_settings(r: int) -> dict:
    return {"r": r, "alpha": float(2 * r), "dropout": 0.0, "target_modules": "all-linear"}


# --- the model ------------------------------------------------------------------------------------


def model_folder(model: str) -> tuple[str, Path]:
    """The base model as a spec names it and its local folder: ``builtin:tiny``, a size of
    ``MODEL_SIZES`` (built once under the cache), or a model folder."""
    if model == "builtin:tiny":
        from align.tiny import build_tiny

        return model, Path(build_tiny())
    if model in MODEL_SIZES:
        folder = build_random_llama(model)
        return str(folder), folder
    return str(Path(model).resolve()), Path(model).resolve()


def build_random_llama(size: str) -> Path:
    """A random-init Llama of ``MODEL_SIZES[size]`` with a 32,000-entry vocabulary and the tokenizer of
    ``builtin:tiny`` (trained the same way, without pretraining the tiny model); saved in fp32 (``small``)
    or bf16 (larger), built on a GPU when there is one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from align import tiny
    from align.paths import cache_dir

    shape = MODEL_SIZES[size]
    name = f"llama-{size}-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-v{VOCAB_SIZE}-{tiny.BUILD_KEY}"
    folder = cache_dir() / "bench" / name
    if (folder / "config.json").is_file():
        return folder
    corpus = tiny.PRETRAIN
    tokenizer = tiny.train_tokenizer(tiny.pretraining_corpus(
        corpus["seed"], corpus["documents"], corpus["english_documents"], corpus["english_sentences"]))
    tokenizer.model_max_length = MAX_POSITIONS
    dtype = torch.float32 if size == "small" else torch.bfloat16
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


# --- the rows -------------------------------------------------------------------------------------


class WordText:
    """Readable English of about a given number of tokens: whole sentences of ``align.english`` drawn
    from a seeded pool, the last one cut to the words that fit."""

    def __init__(self, tokenizer, rng: random.Random, pool: int = 2000):
        from align import english, english_forms

        self.rng = rng
        zipfian = english_forms.Zipfian(rng)
        sentences = [english.sentence(zipfian) for _ in range(pool)]
        counts = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
        self.pool = [(s, len(ids)) for s, ids in zip(sentences, counts)]

    def about(self, tokens: int) -> str:
        words, total = [], 0
        while total < tokens:
            sentence, count = self.rng.choice(self.pool)
            if total + count > tokens:
                cut = sentence.split()
                sentence = " ".join(cut[: max(1, len(cut) * (tokens - total) // count)])
            words.append(sentence)
            total += count
        return " ".join(words)


def longtail_tokens(rng: random.Random, part: str, scale: float) -> int:
    """A long-tail length in tokens for ``part`` (prompt or response), its median and cap times ``scale``."""
    median, sigma, cap = LONGTAIL[part]
    drawn = median * scale * math.exp(sigma * rng.gauss(0.0, 1.0))
    return int(min(cap * scale, max(MIN_TOKENS, drawn)))


def generate_rows(tokenizer, kind: str, count: int, mode: str, max_length: int) -> list[dict]:
    """``count`` rows (SFT ``prompt``/``completion``, DPO ``prompt``/``chosen``/``rejected``) of the
    token lengths ``mode`` asks for; the same seed gives the same rows."""
    rng = random.Random(SEED)
    text = WordText(tokenizer, rng)
    scale = min(1.0, max_length / (LONGTAIL["prompt"][2] + LONGTAIL["response"][2]))
    rows = []
    for _ in range(count):
        if mode == "full":
            prompt = int(max_length * FULL_PROMPT_FRACTION)
            replies = [max_length - prompt + 64] * 2  # longer than the room left: truncation makes them full
        else:
            prompt = longtail_tokens(rng, "prompt", scale)
            replies = [longtail_tokens(rng, "response", scale) for _ in range(2)]
        row = {"prompt": text.about(prompt)}
        if kind == "sft":
            row["completion"] = text.about(replies[0])
        else:
            row["chosen"], row["rejected"] = (text.about(n) for n in replies)
        rows.append(row)
    return rows


def job_spec(args: argparse.Namespace, model: str, data: Path, total_steps: int) -> dict:
    """The one-stage align job the benchmark runs."""
    stage = {
        "type": args.stage,
        "data": {"path": str(data)},
        "max_steps": total_steps,
        "batch_size": args.batch,
        "max_length": args.max_length,
        "lr": LEARNING_RATE[args.stage],
        "lr_scheduler": "cosine",
        "checkpoint_every": None,
        "log_every": 1,
        "seed": SEED,
    }
    if args.stage == "dpo":
        stage.update(beta=BETA, reference="live")
    stage["padding_free"] = True  # align's default, said here: the padded layout is the align_padded side
    gpus = 1 if args.device == "cuda" else 0
    spec = {
        "name": f"bench-{args.stage}",
        "base_model": model,
        "adapter": {"type": "lora", **lora_settings(args.lora_r)},
        "deepspeed": {"zero_stage": args.zero_stage, "precision": "bf16" if args.bf16 else "fp32",
                      "gradient_checkpointing": False},
        "resources": {"num_workers": 1, "cpus_per_worker": args.threads, "gpus_per_worker": gpus},
        "stages": [stage],
    }
    if args.qlora:
        spec["quantization"] = {"bits": 4, "type": "nf4", "double_quant": True}
    return spec


SEQUENCES = {"sft": (("input_ids", "loss_mask"),),
             "dpo": (("chosen_input_ids", "chosen_loss_mask"), ("rejected_input_ids", "rejected_loss_mask"))}


def batch_plan(spec: dict, raw_rows: list[dict]) -> dict:
    """The rows of every step in align's order, with align's token ids, and the tokens each step holds.

    align loads, shuffles and tokenises the rows in ``load_stage_data`` and picks each step's rows with
    ``micro_batch_indices``; the same calls are made here, and each tokenised row is traced back to its
    generated row by its token ids.
    """
    from align.data.order import micro_batch_indices
    from align.data.stage_data import load_stage_data
    from align.data.tokenize import tokenize_dataset
    from align.engine.dist import Rank
    from align.models.load import load_tokenizer, resolve_base_model
    from align.spec import parse_spec

    job = parse_spec(spec)
    stage = job.stages[0]
    kind = "sft" if stage.type == "sft" else "preference"
    sequences = SEQUENCES[stage.type]
    tokenizer = load_tokenizer(resolve_base_model(job.base_model))
    loaded = load_stage_data(stage, kind, tokenizer)
    if loaded.dropped or loaded.eval:
        raise RuntimeError(f"align dropped {loaded.dropped} rows or held {len(loaded.eval)} out; the plan needs all")

    def key(features: dict) -> str:
        return json.dumps([features[ids] for ids, _ in sequences])

    features, _ = tokenize_dataset(raw_rows, loaded.format, kind, tokenizer, stage.max_length, stage.max_prompt_length
                                   if kind == "preference" else None, stage.truncation)
    source = {key(f): i for i, f in enumerate(features)}
    rank = Rank(0, 1, 0)
    rows, token_ids, step_tokens, step_padded, prompt_lengths, response_lengths = [], [], [], [], [], []
    for step in range(stage.max_steps):
        (indices,) = micro_batch_indices(len(loaded.train), step, stage.batch_size, 1, rank, stage.seed)
        sequence_lengths = [len(loaded.train[i][ids]) for ids, _ in sequences for i in indices]
        step_tokens.append(sum(sequence_lengths))
        step_padded.append(len(sequence_lengths) * max(sequence_lengths))
        for i in indices:
            row = loaded.train[i]
            rows.append(raw_rows[source[key(row)]])
            token_ids.append([(row[ids], row[mask]) for ids, mask in sequences])
            prompt_lengths.append(row[sequences[0][1]].index(1))
            response_lengths.extend(sum(row[mask]) for _, mask in sequences)
    return {"rows": rows, "token_ids": token_ids, "step_tokens": step_tokens, "step_padded_tokens": step_padded,
            "prompt_lengths": prompt_lengths, "response_lengths": response_lengths}


# --- the sides, each in its own process ------------------------------------------------------------


def run_align(config: dict) -> dict:
    """align's stage through ``run_job``; step times are the metrics records' timestamps."""
    from align.runner import run_job
    from align.spec import parse_spec

    work = Path(config["work"])
    job = parse_spec(config["spec"])
    run_job(job, work_root=work / "runs", artifact_root=str(work / "artifacts"))
    metrics = work / "runs" / job.stage_names()[0] / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    warmup, total = config["warmup"], config["steps"]
    return {"seconds": steps[total]["time"] - steps[warmup]["time"], "final_loss": steps[total]["loss"]}


def run_trl(config: dict) -> dict:
    """TRL's trainer on the planned rows, read in order; a callback stamps the end of each step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(config["threads"])
    stage, spec_stage = config["stage"], config["spec"]["stages"][0]
    padding_free, bf16 = config["padding_free"], config["bf16"]
    plan = json.loads(Path(config["plan"]).read_text())
    adapter = config["spec"]["adapter"]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    common = {
        "output_dir": str(Path(config["work"]) / "trl"), "max_steps": config["steps"],
        "per_device_train_batch_size": spec_stage["batch_size"], "gradient_accumulation_steps": 1,
        "learning_rate": spec_stage["lr"], "lr_scheduler_type": "cosine", "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "max_length": spec_stage["max_length"], "bf16": bf16, "gradient_checkpointing": False,
        "padding_free": padding_free, "report_to": "none", "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0, "train_sampling_strategy": "sequential", "logging_steps": 1,
        "save_strategy": "no", "eval_strategy": "no", "disable_tqdm": True, "seed": SEED,
    }
    if stage == "sft":
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer

        if padding_free:
            # Padding-free SFT does not truncate: it takes the rows tokenised, as align cut them.
            common["max_length"] = None
            rows = [{"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}
                    for ((ids, mask),) in plan["token_ids"]]
        else:
            rows = plan["rows"]
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        common["beta"] = BETA
        rows = plan["rows"]
    clock = StepClock()
    tokenizer = AutoTokenizer.from_pretrained(config["model_folder"])
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(config["model_folder"], dtype=dtype)
    lora = LoraConfig(r=adapter["r"], lora_alpha=adapter["alpha"], lora_dropout=adapter["dropout"],
                      target_modules=adapter["target_modules"], task_type="CAUSAL_LM")
    trainer = Trainer(model=model, args=Config(**common), train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=lora, callbacks=[clock])
    if trainer.padding_free != padding_free:
        raise RuntimeError(f"TRL's {Trainer.__name__} set padding_free={trainer.padding_free}, asked {padding_free}")
    mismatched = sum(_trl_ids(stage, prepared, spec_stage["max_length"]) != [ids for ids, _ in planned]
                     for prepared, planned in zip(trainer.train_dataset, plan["token_ids"]))
    first_batch = _record_first_forward(trainer.model) if padding_free else None
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    warmup, total = config["warmup"], config["steps"]
    result = {"seconds": clock.ends[total - 1] - clock.ends[warmup - 1], "final_loss": losses[-1],
              "rows_tokenised_differently": mismatched}
    if first_batch is not None:
        result["cross_sequence"] = _cross_sequence_check(trainer.model, first_batch)
    return result


def _trl_ids(stage: str, prepared: dict, max_length: int) -> list[list[int]]:
    """The token ids of a row as TRL trains on it: one sequence for SFT (cut when the data is prepared),
    chosen and rejected for DPO (cut to ``max_length`` by the collator)."""
    if stage == "sft":
        return [prepared["input_ids"]]
    prompt = prepared["prompt_ids"]
    return [(prompt + prepared["chosen_ids"])[:max_length], (prompt + prepared["rejected_ids"])[:max_length]]


def _record_first_forward(model) -> dict:
    """Keep the keyword arguments of the first forward of the transformer body inside ``model`` (peft
    around a causal LM around the body)."""
    kept: dict = {}

    def keep(module, args, kwargs):
        kept.update(kwargs)
        handle.remove()

    handle = model.get_base_model().model.register_forward_pre_hook(keep, with_kwargs=True)
    return kept


def _cross_sequence_check(model, kwargs: dict) -> dict:
    """Whether the sequences of TRL's flattened first batch attended to each other.

    The transformer body runs that batch again as it ran in training (the adapter off, as it started at
    zero) and each sequence alone; ``difference`` is the largest difference of their last hidden states.
    ``if_attending`` is the same difference when the flattened batch is one causal sequence (positions
    running on), what attending across boundaries gives; the hidden states, not the logits, keep the
    check's memory below the training step's.
    """
    import torch

    body = model.get_base_model().model
    positions = kwargs["position_ids"]
    ids = kwargs["input_ids"]
    starts = [*(positions[0] == 0).nonzero().flatten().tolist(), positions.shape[1]]
    with torch.no_grad(), model.disable_adapter():
        flat = body(**kwargs).last_hidden_state[0].float()
        causal = body(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
                      use_cache=False).last_hidden_state[0].float()
        difference = if_attending = 0.0
        for begin, end in itertools.pairwise(starts):
            alone = body(input_ids=ids[:, begin:end], use_cache=False).last_hidden_state[0].float()
            difference = max(difference, (flat[begin:end] - alone).abs().max().item())
            if_attending = max(if_attending, (causal[begin:end] - alone).abs().max().item())
    return {"sequences": len(starts) - 1, "difference": difference, "if_attending": if_attending,
            "attends_across": difference > 0.01 * if_attending}


def run_side(side: str, config: dict, work: Path) -> dict:
    return harness.run_side(__file__, side, config, work, config["threads"])


def trl_padding_free_support(stage: str, folder: Path) -> tuple[bool, str]:
    """Whether TRL's trainer for ``stage`` keeps ``padding_free=True``, and what it logged when it did not,
    found by building one on a two-row set with a one-layer model and the tokenizer in ``folder``."""
    import logging

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    rows = [{"prompt": "a b", "completion": "c", "chosen": "c", "rejected": "d"}] * 2
    options = {"output_dir": tempfile.mkdtemp(prefix="bench-probe-"), "padding_free": True, "report_to": "none",
               "use_cpu": not torch.cuda.is_available()}
    if stage == "sft":
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer

        options["max_length"] = None
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("trl")
    logger.addHandler(handler)
    try:
        trainer = Trainer(model=model, args=Config(**options), train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=LoraConfig(r=1, target_modules="all-linear"))
    finally:
        logger.removeHandler(handler)
        shutil.rmtree(options["output_dir"], ignore_errors=True)
    if trainer.padding_free:
        return True, ""
    words = next((line for line in said if "padding_free" in line), "padding_free was turned off")
    words = words.removeprefix("[RANK 0] ")
    return False, f"{Trainer.__name__}: {words}"


# --- the comparison -------------------------------------------------------------------------------


def percentiles(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"p50": ordered[len(ordered) // 2], "p90": ordered[int(len(ordered) * 0.9)], "max": ordered[-1]}


def compare(args: argparse.Namespace) -> dict:
    """Run the sides ``args.sides`` asks for and return the result (what ``--json`` writes)."""
    os.environ.update({k: v for k, v in harness.child_environment(args.threads).items() if k != "PYTHONPATH"})
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    total = args.warmup + args.steps
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.stage}-"))
    model, folder = model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    raw_rows = generate_rows(tokenizer, args.stage, total * args.batch, args.lengths, args.max_length)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in raw_rows))
    spec = job_spec(args, model, data, total)
    plan = batch_plan(spec, raw_rows)
    (work / "plan.json").write_text(json.dumps(plan))
    if args.lengths == "full" and plan["step_tokens"] != plan["step_padded_tokens"]:
        raise RuntimeError(f"some generated rows are shorter than {args.max_length} tokens; --lengths full needs all")
    timed_tokens = sum(plan["step_tokens"][args.warmup :])
    timed_padded = sum(plan["step_padded_tokens"][args.warmup :])

    config = {"spec": spec, "stage": args.stage, "model_folder": str(folder), "plan": str(work / "plan.json"),
              "steps": total, "warmup": args.warmup, "bf16": args.bf16, "threads": args.threads}
    sides: dict[str, dict] = {}
    if "trl_padding_free" in args.sides:
        supported, reason = trl_padding_free_support(args.stage, folder)
        if not supported:
            sides["trl_padding_free"] = {"skipped": reason}
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for side in SIDES:
            if side not in args.sides or side in sides:
                continue
            side_work = work / f"{side}-{repeat}"
            side_work.mkdir()
            started = time.perf_counter()
            side_config = {**config, "work": str(side_work), "padding_free": side == "trl_padding_free"}
            if side == "align_padded":
                side_config["spec"] = {**spec, "stages": [{**spec["stages"][0], "padding_free": False}]}
            result = run_side(side, side_config, side_work)
            result["wall_s"] = time.perf_counter() - started
            result["tokens_per_s"] = timed_tokens / result["seconds"]
            result["seconds_per_step"] = result["seconds"] / args.steps
            result["working_set_mib"] = result["peak_rss_mib"] - result["rss_before_training_mib"]
            runs.setdefault(side, []).append(result)
    load_after = os.getloadavg()[0]
    sides.update({side: max(side_runs, key=lambda r: r["tokens_per_s"]) for side, side_runs in runs.items()})
    sides = {side: sides[side] for side in SIDES if side in sides}

    import torch
    import trl

    ratios = {}
    for other in ("trl", "trl_padding_free", "align_padded"):
        if "align" in sides and "tokens_per_s" in sides.get(other, {}):
            align_side, trl_side = sides["align"], sides[other]
            ratios[other] = {
                key: align_side[field] / trl_side[field] if trl_side[field] else None
                for key, field in (("speed", "tokens_per_s"), ("peak_rss", "peak_rss_mib"),
                                   ("working_set", "working_set_mib"), ("peak_gpu", "peak_gpu_mib"))
                if align_side.get(field) is not None and trl_side.get(field) is not None
            }
    if args.keep:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "stage": args.stage, "lengths": args.lengths, "model": args.model, "model_folder": str(folder),
        "machine": harness.machine(), "device": args.device, "torch": torch.__version__, "trl": trl.__version__,
        "settings": {"batch": args.batch, "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
                     "precision": "bf16" if args.bf16 else "fp32", "threads": args.threads,
                     "lora": lora_settings(args.lora_r), "zero_stage": args.zero_stage, "qlora": args.qlora,
                     "lr": LEARNING_RATE[args.stage], "repeats": args.repeats},
        "data": {"rows": len(raw_rows), "timed_tokens": timed_tokens, "timed_padded_tokens": timed_padded,
                 "prompt_tokens": percentiles(plan["prompt_lengths"]),
                 "response_tokens": percentiles(plan["response_lengths"])},
        "sides": sides, "runs": {side: [r["tokens_per_s"] for r in side_runs] for side, side_runs in runs.items()},
        "ratios": ratios, "goal": GOAL, "load_average": [load_before, load_after],
    }


def report(result: dict) -> None:
    settings, data = result["settings"], result["data"]
    lora = settings["lora"]
    unit = "pairs" if result["stage"] == "dpo" else "rows"
    extra = f"; ZeRO-{settings['zero_stage']}" + ("; QLoRA nf4" if settings["qlora"] else "")
    print(
        f"\n{result['stage'].upper()}, {settings['precision']}, {result['lengths']} lengths; model {result['model']}; "
        f"LoRA r={lora['r']} alpha={lora['alpha']:g} all-linear; {settings['batch']} {unit}/step, max length "
        f"{settings['max_length']}; {settings['steps']} timed steps after {settings['warmup']} warm-up; "
        f"{settings['threads']} threads{extra}"
    )
    prompt, response = data["prompt_tokens"], data["response_tokens"]
    print(
        f"data: {data['rows']} {unit}; prompt tokens p50/p90/max {prompt['p50']}/{prompt['p90']}/{prompt['max']}, "
        f"response tokens {response['p50']}/{response['p90']}/{response['max']}; timed steps hold "
        f"{data['timed_tokens']:,} non-pad tokens ({data['timed_tokens'] / data['timed_padded_tokens']:.0%} of the "
        f"padded batches)"
    )
    print(result["machine"] + f"; torch {result['torch']}, TRL {result['trl']}\n")
    gpu = any(side.get("peak_gpu_mib") for side in result["sides"].values())
    header = f"{'':<24}{'tokens/s':>10}{'peak RSS MiB':>14}{'working set':>13}"
    print(header + (f"{'peak GPU MiB':>14}" if gpu else "") + f"{'final loss':>12}{'run s':>8}")
    for name, side in result["sides"].items():
        if "skipped" in side:
            print(f"{SIDE_NAMES[name]:<24}not run: {side['skipped']}")
            continue
        line = (f"{SIDE_NAMES[name]:<24}{side['tokens_per_s']:>10,.0f}{side['peak_rss_mib']:>14,.0f}"
                f"{side['working_set_mib']:>13,.0f}")
        line += f"{side['peak_gpu_mib']:>14,.0f}" if gpu else ""
        print(line + f"{side['final_loss']:>12.4f}{side['wall_s']:>8.1f}")
    for other, ratio in result["ratios"].items():
        line = (f"{'align/' + SIDE_NAMES[other]:<24}{ratio['speed']:>9.2f}x{ratio['peak_rss']:>13.2f}x"
                f"{ratio['working_set']:>12.2f}x")
        print(line + (f"{ratio['peak_gpu']:>13.2f}x" if "peak_gpu" in ratio else ""))
    if result["ratios"]:
        speed, memory = f">={GOAL['speed']:.1f}x", f"<={GOAL['memory']:.1f}x"
        print(f"{'goal':<24}{speed:>10}{memory:>14}{memory:>13}")
    if result["settings"]["repeats"] > 1:
        for name, listed in result["runs"].items():
            print(f"{SIDE_NAMES[name]} tokens/s of each run (the fastest is shown above): "
                  f"{', '.join(f'{x:,.0f}' for x in listed)}")
    before, after = result["load_average"]
    print(f"load average (1 min) before / after: {before:.2f} / {after:.2f} on {os.cpu_count()} CPUs")
    for name, side in result["sides"].items():
        if side.get("rows_tokenised_differently"):
            count = side["rows_tokenised_differently"]
            print(f"warning: {SIDE_NAMES[name]} tokenised {count} rows differently from align")
        if "cross_sequence" in side:
            check = side["cross_sequence"]
            verdict = ("sequences attend across their boundaries" if check["attends_across"]
                       else "no sequence attends to another")
            print(f"{SIDE_NAMES[name]}: first batch ({check['sequences']} sequences flattened) against each "
                  f"sequence alone, largest hidden-state difference {check['difference']:.1e} (attending across "
                  f"would give {check['if_attending']:.1e}): {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["sft", "dpo"], default="dpo", help="align stage and TRL trainer")
    parser.add_argument("--lengths", choices=["longtail", "full"], default="longtail", help="token lengths of the rows")
    parser.add_argument("--model", default="small",
                        help=f"{', '.join(MODEL_SIZES)} (a random 32k-vocabulary Llama), builtin:tiny, or a folder")
    parser.add_argument("--max-length", type=int, help="longest sequence (default 2048 long-tail, 512 full)")
    parser.add_argument("--batch", type=int, help="SFT rows or DPO pairs per step (default 8 and 4)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and left out of the timing")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 on every side (default fp32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on each side")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha is twice the rank)")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0, help="align's ZeRO stage")
    parser.add_argument("--qlora", action="store_true", help="align with a 4-bit nf4 base (QLoRA); align only")
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                        help=f"comma-separated, of {', '.join(SIDES)} (default {','.join(DEFAULT_SIDES)})")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, in turn; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="2 timed steps after 1 warm-up: a smoke check")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, metrics); print its path")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    if min(args.warmup, args.steps, args.repeats, args.batch or 1, args.threads) < 1:
        parser.error("--warmup, --steps, --repeats, --batch and --threads must be at least 1")
    args.sides = args.sides.split(",")
    if unknown := set(args.sides) - set(SIDES):
        parser.error(f"--sides: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")
    if args.qlora and args.sides != ["align"]:
        parser.error("--qlora runs align only: add --sides align")
    args.batch = args.batch or DEFAULT_BATCH[args.stage]
    args.max_length = args.max_length or DEFAULT_MAX_LENGTH[args.lengths]
    if args.model == "builtin:tiny":
        args.max_length = min(args.max_length, 256)  # the tiny model's positions
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
        harness.child_main({"align": run_align, "align_padded": run_align, "trl": run_trl, "trl_padding_free": run_trl})
    else:
        sys.exit(main())
