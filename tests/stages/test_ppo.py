"""The PPO stage: step-1 identities, the reward model it scores with, resuming, and a quality bar on
the built-in task."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.rewards import REWARDS
from align.runner import run_job
from align.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]


class StopAt(Exception):
    pass


def metrics_of(work: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]


def manifest_of(artifact) -> dict:
    return json.loads((Path(artifact.uri) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"add {n} and {n % 7}"}) + "\n" for n in range(40)))
    return path


def rl_job(job_factory, model, data, prompts, ppo: dict, rm: dict | None = None):
    """SFT, a reward model over the SFT policy, then ``ppo`` (a ppo or grpo stage), on the small model."""
    return job_factory(
        model,
        [
            {"type": "sft", "data": {"path": str(data["sft"])}, "batch_size": 4, "max_steps": 2, "lr": 1e-3},
            {"type": "rm", "data": {"path": str(data["prefs"]), "eval_path": str(data["prefs"])}, "batch_size": 4,
             "max_steps": 3, "lr": 1e-3, **(rm or {})},
            {"data": {"path": str(prompts), "eval_fraction": 0.2}, "batch_size": 4, "max_new_tokens": 5,
             "max_length": 48, "lr": 1e-2, **ppo},
        ],
    )


def test_ppo_starts_at_the_reference_and_scores_with_the_job_reward_model(
    small_model, small_data, prompts_file, job_factory, tmp_path
):
    job = rl_job(job_factory, small_model, small_data, prompts_file,
                 {"type": "ppo", "max_steps": 2, "ppo_epochs": 2, "critic_lr": 1e-2, "kl_coef": 0.1})
    sft, rm, ppo = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    records = metrics_of(tmp_path / "work", "ppo")
    assert records[0]["step"] == 0 and records[0]["eval_kl"] == pytest.approx(0.0, abs=1e-6)
    steps = [r for r in records if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    first = steps[0]
    # The samples come from the policy, which starts as the frozen reference (the SFT adapter):
    # the KL in the reward is 0 and the first pass's ratio is exactly 1.
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["first_pass_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert 1 <= first["response_length"] <= 5 and first["entropy"] > 0
    assert first["kl_coef"] == 0.1
    for key in ("policy_loss", "value_loss", "reward_mean", "reward_std", "approx_kl", "samples_per_s"):
        assert math.isfinite(first[key]), key
    assert first["reward_std"] > 0, "the reward model gives every sample the same score"
    assert steps[1]["kl"] != 0.0, "the policy never moved away from the reference"

    # PPO's parents: the policy it continued and the reward model it scored with.
    manifest = manifest_of(ppo.artifact)
    assert manifest["parents"] == [sft.artifact.artifact_id, rm.artifact.artifact_id]
    assert manifest["stage"] == {"type": "ppo", "index": 2, "name": "ppo"}
    trained = load_file(Path(ppo.artifact.uri) / "adapter_model.safetensors")
    start = load_file(Path(sft.artifact.uri) / "adapter_model.safetensors")
    assert sorted(trained) == sorted(start)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    samples = [json.loads(line) for line in (Path(ppo.artifact.uri) / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4
    assert all(s["prompt"].startswith("add ") and math.isfinite(s["score"]) for s in samples)

    # The reward model over the SFT policy carries that policy's adapter as its body.
    assert (Path(rm.artifact.uri) / "body" / "adapter_model.safetensors").is_file()


def test_reward_model_artifact_scores_as_it_did_in_training(small_model, small_data, job_factory, tmp_path):
    from align.data import collate, load, tokenize
    from align.models.load import load_tokenizer
    from align.models.reward import load_frozen_reward_model, sequence_scores, token_scores

    job = job_factory(small_model, [
        {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 4, "max_steps": 2, "lr": 1e-3},
        {"type": "rm", "data": {"path": str(small_data["prefs"]), "eval_path": str(small_data["prefs"])},
         "batch_size": 4, "max_steps": 3, "lr": 1e-2},
    ])
    _, rm = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    tokenizer = load_tokenizer(small_model)
    model = load_frozen_reward_model(small_model, Path(rm.artifact.uri), torch.float32, tokenizer.pad_token_id, None)
    rows = list(load.load_rows(str(small_data["prefs"])))
    items = [tokenize.tokenize_preference(r, "preference", tokenizer, 512) for r in rows]
    batch = collate.collate_preference(items, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(token_scores(model, batch["input_ids"], batch["attention_mask"]),
                                 batch["input_ids"], tokenizer.pad_token_id)
        pooled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    # Reading the head per token at the last real token is what the sequence-classification model pools.
    torch.testing.assert_close(scores, pooled.float(), rtol=1e-5, atol=1e-5)
    chosen, rejected = scores.chunk(2)
    final = [r for r in metrics_of(tmp_path / "work", "rm") if "eval_reward_mean" in r][-1]
    assert ((chosen + rejected) / 2).mean().item() == pytest.approx(final["eval_reward_mean"], rel=1e-4, abs=1e-5)
    assert (chosen > rejected).double().mean().item() == pytest.approx(final["eval_accuracy"])


def test_ppo_with_a_critic_from_the_policy_and_a_reward_function(
    small_model, small_data, prompts_file, job_factory, tmp_path, monkeypatch
):
    monkeypatch.setitem(REWARDS, "exact_answer", lambda prompt, completion: float(len(completion) % 3))
    job = job_factory(small_model, [
        {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 4, "max_steps": 2, "lr": 1e-3},
        {"type": "ppo", "data": {"path": str(prompts_file)}, "reward": "exact_answer", "critic_init": "policy",
         "batch_size": 4, "gradient_accumulation_steps": 2, "max_new_tokens": 5, "max_length": 48,
         "max_steps": 2, "ppo_epochs": 1, "lr": 1e-2},
    ])
    sft, ppo = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    first, _second = metrics_of(tmp_path / "work", "ppo")
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    # One pass over two micro-batches: the optimizer steps once, after both, so the ratio is 1 throughout.
    assert first["ratio"] == first["first_pass_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["clip_fraction"] == 0.0
    assert first["reward_std"] > 0
    assert manifest_of(ppo.artifact)["parents"] == [sft.artifact.artifact_id]


def test_ppo_resume_reproduces_uninterrupted_run(small_model, small_data, prompts_file, job_factory, tmp_path):
    job = rl_job(job_factory, small_model, small_data, prompts_file,
                 {"type": "ppo", "max_steps": 4, "checkpoint_every": 2, "ppo_epochs": 2, "kl_target": 0.01,
                  "kl_horizon": 16})
    *_, straight = run_job(job, work_root=tmp_path / "straight", artifact_root=str(tmp_path / "a1"))

    def crash_in_step_3(stage, record):
        if stage == "ppo" and record.get("step") == 3 and "policy_loss" in record:
            raise StopAt()

    with pytest.raises(StopAt):
        run_job(job, work_root=tmp_path / "resumed", artifact_root=str(tmp_path / "a2"), on_metrics=crash_in_step_3)
    checkpoint = tmp_path / "resumed" / "ppo" / "checkpoints" / "step-00000002"
    assert (checkpoint / "critic").is_dir() and json.loads((checkpoint / "align_state.json").read_text())["kl_coef"] > 0
    *_, resumed = run_job(job, work_root=tmp_path / "resumed", artifact_root=str(tmp_path / "a2"))

    def trace(work):
        keys = ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss")
        return [[r[k] for k in keys] for r in metrics_of(work, "ppo") if "policy_loss" in r]

    # The critic, the optimizers and the adaptive KL coefficient all come back from the checkpoint.
    assert trace(tmp_path / "resumed") == trace(tmp_path / "straight")
    assert len({row[2] for row in trace(tmp_path / "straight")}) == 4, "the KL coefficient never adapted"
    a = load_file(Path(straight.artifact.uri) / "adapter_model.safetensors")
    b = load_file(Path(resumed.artifact.uri) / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_scores_with_the_job_reward_model(small_model, small_data, prompts_file, job_factory, tmp_path):
    job = rl_job(job_factory, small_model, small_data, prompts_file,
                 {"type": "grpo", "reward": "model", "group_size": 3, "max_steps": 1, "eval_exact_match": False})
    sft, rm, grpo = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    (record,) = [r for r in metrics_of(tmp_path / "work", "grpo") if "loss" in r]
    assert record["kl"] == pytest.approx(0.0, abs=1e-6)
    assert record["reward_std"] > 0 and record["flat_group_fraction"] < 1.0
    assert "accuracy" not in record, "a reward model's scores have no right answer to count"
    assert manifest_of(grpo.artifact)["parents"] == [sft.artifact.artifact_id, rm.artifact.artifact_id]


def test_ppo_raises_held_out_reward_over_sft_within_the_kl_bound(tmp_path):
    """examples/tiny-sft-rm-ppo.yaml as it is: the reward model learns the parity preferences, and PPO
    against it lifts the SFT policy's held-out reward on the prompts SFT answers worst."""
    job = parse_spec(yaml.safe_load((REPO / "examples" / "tiny-sft-rm-ppo.yaml").read_text()))
    started = time.perf_counter()
    run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    rm_eval = [r for r in metrics_of(tmp_path / "work", "rm") if "eval_accuracy" in r][-1]
    assert rm_eval["eval_accuracy"] >= 0.95
    evals = [r for r in metrics_of(tmp_path / "work", "ppo") if "eval_reward_mean" in r]
    assert [r["step"] for r in evals] == [0, job.stages[2].max_steps]
    before, after = evals[0], evals[-1]
    gain = after["eval_reward_mean"] - before["eval_reward_mean"]
    print(f"held-out reward (builtin:parity/eval_tell): sft {before['eval_reward_mean']:.2f} "
          f"(std over prompts {before['eval_prompt_reward_std']:.2f}) -> ppo {after['eval_reward_mean']:.2f}, "
          f"KL {after['eval_kl']:.2f}, exact match {before['eval_exact_match']:.3f} -> "
          f"{after['eval_exact_match']:.3f}, {time.perf_counter() - started:.0f}s")
    # The gain is at least 1.5 standard deviations of the SFT policy's reward over held-out prompts (each
    # prompt's reward: the mean over its sampled completions). Measured: 2.2 of them in bf16 on one 2-core
    # machine (-1.5 -> 3.1, spread 2.1), 1.8 in bf16 on a 2-core Xeon (-1.57 -> 3.16, spread 2.59), 6 in fp32
    # held to AVX2 (-1.5 -> 7.3, spread 1.4); greedy accuracy rises by 0.66 or more on each.
    assert gain >= 1.5 * before["eval_prompt_reward_std"]
    # ... while the policy stays within the KL bound the spec sets as the adaptive controller's target.
    assert after["eval_kl"] <= job.stages[2].kl_target
    assert after["eval_exact_match"] >= before["eval_exact_match"] + 0.4


def test_ppo_scores_with_a_named_fully_trained_reward_model(
    small_model, small_data, prompts_file, job_factory, tmp_path
):
    """`reward_model: artifact:<id>` from another job; that reward model was fully fine-tuned, so the
    critic is a fresh adapter over it and the reward model is the same body with the adapter off."""
    artifacts = str(tmp_path / "artifacts")
    rm_job = job_factory(small_model, [
        {"type": "rm", "data": {"path": str(small_data["prefs"])}, "init": "base", "batch_size": 4, "max_steps": 2,
         "lr": 1e-3},
    ], name="full-rm", adapter={"type": "full"})
    (rm,) = run_job(rm_job, work_root=tmp_path / "rm-work", artifact_root=artifacts)
    assert (Path(rm.artifact.uri) / "model.safetensors").is_file()

    job = job_factory(small_model, [
        {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 4, "max_steps": 2, "lr": 1e-3},
        {"type": "ppo", "data": {"path": str(prompts_file)}, "reward_model": rm.artifact.ref, "batch_size": 4,
         "max_new_tokens": 5, "max_length": 48, "max_steps": 2, "ppo_epochs": 1, "lr": 1e-2, "critic_lr": 1e-2},
    ])
    sft, ppo = run_job(job, work_root=tmp_path / "work", artifact_root=artifacts)

    first, second = metrics_of(tmp_path / "work", "ppo")
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["reward_std"] > 0
    assert math.isfinite(first["value_loss"]) and second["kl"] != 0.0
    assert manifest_of(ppo.artifact)["parents"] == [sft.artifact.artifact_id, rm.artifact.artifact_id]

    wrong = job_factory(small_model, [
        {"type": "ppo", "data": {"path": str(prompts_file)}, "reward_model": sft.artifact.ref, "max_new_tokens": 5,
         "max_length": 48},
    ])
    with pytest.raises(ValueError, match="is an artifact of kind 'adapter', not a reward model"):
        run_job(wrong, work_root=tmp_path / "wrong", artifact_root=artifacts)
    (tmp_path / "other-model").symlink_to(small_model)  # the same weights under another name
    other_base = job_factory(tmp_path / "other-model", [
        {"type": "ppo", "data": {"path": str(prompts_file)}, "reward_model": rm.artifact.ref, "max_new_tokens": 5,
         "max_length": 48},
    ])
    with pytest.raises(ValueError, match="was trained on base model .* give a reward model trained on the same base"):
        run_job(other_base, work_root=tmp_path / "other", artifact_root=artifacts)
