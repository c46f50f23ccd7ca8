"""The planner (align.plan, align.plan_memory): parameter counts against real models, memory and time
accounting worked out by hand, and ``align plan`` on an example spec.

The built-in tiny model's shape is used throughout: vocabulary 1,024, hidden 256, MLP 688, 4 layers,
4 heads of 64 (4 key/value heads), untied head. One layer's linears: attention 4 x 256 x 256 = 262,144
and MLP 3 x 256 x 688 = 528,384, together 790,528; with its two norms (512) 791,040.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from align.plan import GPUS, cpu_device, plan_job
from align.plan_memory import (
    GiB,
    ModelShape,
    Pass,
    PlanError,
    activation_bytes,
    adapter_parameters,
    kv_cache_bytes,
    layer_activation_bytes,
    logits_bytes,
    model_state_bytes,
    weight_bytes,
)
from align.spec import AdapterSpec, QuantizationSpec, parse_spec

REPO = Path(__file__).resolve().parents[2]
TINY = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False}
TINY_SHAPE = ModelShape.from_config(LlamaConfig(**TINY))
SMALL = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 2}


# --- parameters ---------------------------------------------------------------------------------------


def test_tiny_parameters_by_hand():
    """Embeddings 1,024 x 256 = 262,144; layers 4 x 791,040 = 3,164,160; final norm 256; head 262,144:
    3,688,704. The reward model drops the head for a 256 x 1 score: 3,426,816."""
    assert TINY_SHAPE.layer_parameters() == 791_040
    assert TINY_SHAPE.parameters() == 262_144 + 3_164_160 + 256 + 262_144 == 3_688_704
    assert TINY_SHAPE.parameters("score") == 3_688_704 - 262_144 + 256 == 3_426_816


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**SMALL, tie_word_embeddings=False),
        LlamaConfig(**SMALL, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=16),
        MistralConfig(**SMALL),
        Qwen2Config(**SMALL, tie_word_embeddings=False),
        Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True),
    ],
    ids=["llama-gqa", "llama-tied-biases", "mistral", "qwen2", "qwen3"],
)
def test_parameters_match_transformers_models(config):
    """``sum(p.numel())`` of the model transformers builds from the config, causal LM and one-label
    sequence classifier."""
    shape = ModelShape.from_config(config)
    causal = AutoModelForCausalLM.from_config(config)
    assert shape.parameters("lm") == sum(p.numel() for p in causal.parameters())
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config)
    assert shape.parameters("score") == sum(p.numel() for p in classifier.parameters())


def test_adapter_parameters_by_hand_and_against_peft():
    """LoRA r=16 on all seven linears of a layer: attention 4 x 16 x (256 + 256) = 32,768, MLP
    3 x 16 x (256 + 688) = 45,312; 78,080 a layer, 312,320 in all. On q and v only: 4 x 2 x 16 x 512
    = 65,536. DoRA adds each linear's out_features: 4 x (4 x 256 + 2 x 688 + 256) = 10,624. The reward
    model also trains a copy of its 256-wide score head: 312,576. Full fine-tuning: every parameter."""
    from peft import LoraConfig, get_peft_model

    lora = AdapterSpec(type="lora", r=16)
    assert adapter_parameters(TINY_SHAPE, lora) == 312_320
    assert adapter_parameters(TINY_SHAPE, AdapterSpec(r=16, target_modules=["q_proj", "v_proj"])) == 65_536
    assert adapter_parameters(TINY_SHAPE, AdapterSpec(type="dora", r=16)) == 312_320 + 10_624
    assert adapter_parameters(TINY_SHAPE, lora, head="score") == 312_576
    assert adapter_parameters(TINY_SHAPE, AdapterSpec(type="full")) == 3_688_704
    with pytest.raises(PlanError, match="embed_tokens"):
        adapter_parameters(TINY_SHAPE, AdapterSpec(target_modules=["embed_tokens"]))

    config = LlamaConfig(**TINY, num_labels=1)
    for task, model_class, head in (("CAUSAL_LM", AutoModelForCausalLM, "lm"),
                                    ("SEQ_CLS", AutoModelForSequenceClassification, "score")):
        for adapter in (lora, AdapterSpec(type="dora", r=16)):
            peft_model = get_peft_model(model_class.from_config(config), LoraConfig(
                r=adapter.r, target_modules=adapter.target_modules, use_dora=adapter.type == "dora", task_type=task))
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            assert adapter_parameters(TINY_SHAPE, adapter, head) == trainable


def test_ia3_and_bias_parameters_by_hand_and_against_peft():
    """IA3 on Llama's default targets: k_proj and v_proj rescale their 256 outputs, down_proj (feed-forward)
    its 688 inputs: 256 + 256 + 688 = 1,200 a layer, 4,800 in 4 layers. On [q_proj, up_proj, down_proj]:
    256 + 688 + 688 = 1,632 a layer, 6,528. The reward model adds its 256-wide score head: 5,056. Bias
    training of a Llama with attention and MLP biases: q, k, v, o 4 x 256, gate and up 2 x 688, down 256:
    2,656 a layer, 10,624 in all; Llama without biases has none."""
    from peft import IA3Config, get_peft_model
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    from align.models.adapters import ia3_modules
    from align.plan_memory import IA3_FEEDFORWARD, IA3_TARGETS

    ia3 = AdapterSpec(type="ia3")
    assert adapter_parameters(TINY_SHAPE, ia3) == 4 * (256 + 256 + 688) == 4_800
    listed = AdapterSpec(type="ia3", target_modules=["q_proj", "up_proj", "down_proj"])
    assert adapter_parameters(TINY_SHAPE, listed) == 4 * (256 + 688 + 688) == 6_528
    assert adapter_parameters(TINY_SHAPE, ia3, head="score") == 4_800 + 256
    biased = ModelShape.from_config(LlamaConfig(**TINY, attention_bias=True, mlp_bias=True))
    assert adapter_parameters(biased, AdapterSpec(type="bias")) == 4 * (4 * 256 + 2 * 688 + 256) == 10_624
    assert adapter_parameters(TINY_SHAPE, AdapterSpec(type="bias")) == 0

    for model_type, targets in IA3_TARGETS.items():
        assert list(targets) == TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]
        assert list(IA3_FEEDFORWARD) == TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]
    config = LlamaConfig(**TINY, num_labels=1)
    for task, model_class, head in (("CAUSAL_LM", AutoModelForCausalLM, "lm"),
                                    ("SEQ_CLS", AutoModelForSequenceClassification, "score")):
        for adapter in (ia3, listed):
            targets, feedforward = ia3_modules(adapter.target_modules, "llama")
            peft_model = get_peft_model(model_class.from_config(config), IA3Config(
                target_modules=targets, feedforward_modules=feedforward, task_type=task))
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            assert adapter_parameters(TINY_SHAPE, adapter, head) == trainable


def test_pissa_reference_and_continued_adapter_are_counted():
    """A first DPO stage with PiSSA holds a frozen copy of the starting matrices beside its adapter: base
    3,688,704 + 2 x 312,320 = 4,313,344 (with LoRA's default init 4,001,024: the reference is the base with
    the adapter disabled). After SFT it continues the rank-32 adapter SFT saved and holds a copy of it:
    3,688,704 + 2 x 624,640 = 4,937,984, 624,640 trainable."""
    config = LlamaConfig(**TINY)
    dpo = {"type": "dpo", "data": {"path": "p.jsonl"}, "max_length": 64}
    (first,) = plan_job(_job([dpo], adapter={"r": 16, "init": "pissa"}), config, GPUS["h200"])
    assert (first.parameters, first.trainable) == (4_313_344, 312_320)
    _, after_sft = plan_job(_job([SFT, dpo], adapter={"r": 16, "init": "pissa"}), config, GPUS["h200"])
    assert (after_sft.parameters, after_sft.trainable) == (4_937_984, 624_640)


# --- memory ---------------------------------------------------------------------------------------------


def test_weight_bytes_by_hand():
    """fp32 3,688,704 x 4 = 14,754,816; bf16 half of it. QLoRA (nf4, double quantisation, bf16): the
    3,162,112 weights of the layers' linears at 0.5 + 1/64 + 4/(64 x 256) = 0.515869140625 bytes:
    1,631,236; the other 526,592 (embeddings, head, norms) at 2 bytes: 1,053,184; 2,684,420 in all.
    Without double quantisation the constant is 4/64: 0.5625 x 3,162,112 = 1,778,688. 8-bit: 1 byte
    a weight and a float32 scale per output row: 4 x (4 x 256 + 2 x 688 + 256) x 4 = 42,496."""
    assert weight_bytes(TINY_SHAPE, 4) == 14_754_816
    assert weight_bytes(TINY_SHAPE, 2) == 7_377_408
    nf4 = QuantizationSpec(bits=4, type="nf4", double_quant=True)
    assert weight_bytes(TINY_SHAPE, 2, nf4) == 1_631_236 + 1_053_184
    assert weight_bytes(TINY_SHAPE, 2, QuantizationSpec(double_quant=False)) == 1_778_688 + 1_053_184
    assert weight_bytes(TINY_SHAPE, 2, QuantizationSpec(bits=8)) == 3_162_112 + 42_496 + 1_053_184


def test_model_states_by_zero_stage():
    """One million trainable parameters on 4 ranks. bf16: gradients 2 B, optimizer 12 B (fp32 master,
    two moments), with the 2-byte weight 16 B as in ZeRO Section 3.1; fp32: 4 + 8 (+ 4 weight) = 16 B.
    ZeRO-1 divides the optimizer (3,000,000), ZeRO-2 also the gradients (500,000). ZeRO-1/2 hold a
    5e8-element bucket in the gradient dtype on a GPU (1e9 bytes in bf16), on a CPU only what is written
    (1e6 elements: 2e6 bytes); ZeRO-3 two buckets of hidden² (2 x 256² x 2 = 262,144). Offloading moves
    the 3,000,000 to host memory with a float32 gradient partition (1e6 x 4 / 4 = 1e6). The bf16
    optimizer step copies the gradients to float32: 4e6 bytes, 1e6 per rank when partitioned."""
    million = 1_000_000
    zero0 = model_state_bytes(million, "bf16", 0, 4, False, True, 256)
    assert (zero0.gradients, zero0.optimizer, zero0.buckets, zero0.step) == (2e6, 12e6, 0, 4e6)
    zero1 = model_state_bytes(million, "bf16", 1, 4, False, True, 256)
    assert (zero1.gradients, zero1.optimizer, zero1.buckets, zero1.step) == (2e6, 3e6, 1e9, 1e6)
    zero2_cpu = model_state_bytes(million, "bf16", 2, 4, False, False, 256)
    assert (zero2_cpu.gradients, zero2_cpu.optimizer, zero2_cpu.buckets) == (5e5, 3e6, 2e6)
    zero3 = model_state_bytes(million, "bf16", 3, 4, False, True, 256)
    assert (zero3.gradients, zero3.optimizer, zero3.buckets) == (5e5, 3e6, 262_144)
    offload = model_state_bytes(million, "bf16", 2, 4, True, True, 256)
    assert (offload.optimizer, offload.offloaded, offload.step) == (0, 3e6 + 1e6, 0)
    fp32 = model_state_bytes(million, "fp32", 0, 1, False, True, 256)
    assert (fp32.gradients, fp32.optimizer, fp32.step) == (4e6, 8e6, 0)


def test_activations_by_hand():
    """Two sequences of 512 (b = 2, s = 512) on the tiny shape (h = 256, a = 4), bf16. Korthikanti
    et al.'s Eq. 1 per layer: s·b·h·(34 + 5·a·s/h) = 512 x 2 x 256 x (34 + 40) = 19,398,656: that is
    34 x 256 x 1,024 tokens = 8,912,896 plus 5 x 4 x 2 x 512 x 512 = 10,485,760 for the scores. Fused
    attention keeps a float32 log-sum-exp per head and token instead: 4 x 4 x 1,024 = 16,384, so
    8,929,280. fp32 doubles the 16-bit term: 17,825,792 + 16,384. Four layers: 35,717,120;
    with checkpointing each layer keeps its 1,024 x 256 x 2-byte input (524,288), 2,097,152 for four,
    plus one layer's 8,929,280. A pass of 8 completions of 4 tokens over a 60-token cached prompt also
    keeps the prompt's keys and values: 2 x 256 x 8 x 60 x 2 = 491,520 a layer."""
    pairs = Pass(sequences=2, queries=512, keys=512, scored=0)
    assert layer_activation_bytes(pairs, TINY_SHAPE, 2, fused_attention=False) == 512 * 2 * 256 * 74 == 19_398_656
    assert layer_activation_bytes(pairs, TINY_SHAPE, 2) == 8_912_896 + 16_384
    assert layer_activation_bytes(pairs, TINY_SHAPE, 4) == 17_825_792 + 16_384
    assert activation_bytes([pairs], TINY_SHAPE, 2, checkpointing=False) == 4 * 8_929_280
    assert activation_bytes([pairs], TINY_SHAPE, 2, checkpointing=True) == 2_097_152 + 8_929_280
    completions = Pass(sequences=8, queries=4, keys=64, scored=32)
    assert layer_activation_bytes(completions, TINY_SHAPE, 2) == 34 * 256 * 32 + 491_520 + 4 * 4 * 32


def test_logits_and_kv_cache_by_hand():
    """1,000 scored positions x 1,024 vocabulary in bf16, trained: logits and their gradient, 2 + 2
    bytes (4,096,000), plus two float32 working chunks of all 1,024,000 elements (8,192,000). Frozen:
    one copy (2,048,000) and the chunks. A million positions: the chunks stop at 2^26 elements
    (2 x 2^26 x 4 = 536,870,912). KV cache of 64 rows of 64 positions: keys and values, 4 layers,
    4 x 64 wide, 2 bytes: 2 x 4 x 256 x 64 x 64 x 2 = 16,777,216."""
    assert logits_bytes(1000, 1024, 2, trained=True) == 4_096_000 + 8_192_000
    assert logits_bytes(1000, 1024, 2, trained=False) == 2_048_000 + 8_192_000
    assert logits_bytes(1000, 1024, 4, trained=True) == 8_192_000 + 4_096_000
    assert logits_bytes(1_000_000, 1024, 2, trained=True) == 4_096_000_000 + 536_870_912
    assert kv_cache_bytes(64, 64, TINY_SHAPE, 2) == 16_777_216


# --- stages ---------------------------------------------------------------------------------------------


def _job(stages: list[dict], **fields):
    return parse_spec({"name": "plan", "base_model": "builtin:tiny", "adapter": {"r": 16}, "stages": stages, **fields})


SFT = {"type": "sft", "data": {"path": "d.jsonl"}, "batch_size": 16, "max_length": 64}


def test_sft_stage_by_hand():
    """SFT, 16 rows of 64, packed, bf16 on an H100, one rank. Weights (3,688,704 + 312,320 adapter) x 2
    = 8,002,048. Adapter states 312,320 x 14 = 4,372,480; the step's float32 copy 1,249,280. Activations:
    4 layers x (34 x 256 x 1,024 x 1 + 4 x 4 x 1,024) = 35,717,120. Logits of the 16 x 63 = 1,008 scored
    positions: 1,008 x 1,024 x 4 + 2 chunks x 1,032,192 x 4 = 12,386,304. Total with 1 GiB of runtime:
    1,073,741,824 + 8,002,048 + 4,372,480 + 35,717,120 + 12,386,304 = 1,134,219,776.
    Time: 2 x (4 x 790,528 + 312,320) = 6,948,864 flops a token forward, 2 x 1,024 x 256 = 524,288 more
    per scored position; trained x3: 3 x (1,024 x 6,948,864 + 1,008 x 524,288) = 22,932,357,120 flops,
    at 30% of 989 TFLOP/s 77 µs, under the least time of a forward and backward through 4 layers at
    2 ms a layer each way (3 x 4 x 2 ms = 24 ms). On 2 CPU cores (fp32, 70 GFLOP/s each at 50%) the
    flops take 0.3276 s."""
    (sft,) = plan_job(_job([SFT], deepspeed={"precision": "auto"}), LlamaConfig(**TINY), GPUS["h100"])
    assert sft.precision == "bf16"
    assert (sft.parameters, sft.trainable) == (4_001_024, 312_320)
    assert sft.weights == 8_002_048
    assert (sft.gradients + sft.optimizer, sft.buckets, sft.optimizer_step) == (4_372_480, 0, 1_249_280)
    assert sft.activations == 35_717_120
    assert sft.logits == 12_386_304
    assert sft.total == 1_134_219_776
    assert sft.tokens == 1024
    assert sft.flops == 22_932_357_120
    assert sft.step_seconds == pytest.approx(0.024)
    cpu_job = _job([SFT], deepspeed={"precision": "fp32"}, resources={"cpus_per_worker": 2})
    (on_cpu,) = plan_job(cpu_job, LlamaConfig(**TINY), cpu_device())
    assert on_cpu.step_seconds == pytest.approx(22_932_357_120 / (2 * 70e9 * 0.5))
    assert sft.fits and sft.budget == 81_559 * 2**20


def test_stage_residents_and_partitioning():
    """What each stage holds, in parameters. DPO after SFT: policy 3,688,704 + adapter 312,320 + the
    frozen copy of the SFT adapter 312,320 = 4,313,344; a fresh adapter's reference is the base with the
    adapter disabled (4,001,024). PPO: that policy side again plus the critic's base with a score head
    (3,426,816) and its adapter (312,576) and the frozen reward adapter beside it (312,576): 8,365,312,
    two engines training 312,320 + 312,576. ZeRO-3 on 4 ranks divides what the engines hold by 4."""
    config = LlamaConfig(**TINY)
    dpo = {"type": "dpo", "data": {"path": "p.jsonl"}, "max_length": 64}
    rm = {"type": "rm", "data": {"path": "p.jsonl"}, "max_length": 64}
    ppo = {"type": "ppo", "data": {"path": "q.jsonl"}, "max_length": 64, "max_new_tokens": 4}
    plans = plan_job(_job([SFT, rm, dpo, ppo]), config, GPUS["h200"])
    assert [p.parameters for p in plans] == [4_001_024, 3_739_392, 4_313_344, 8_365_312]
    assert plans[3].trainable == 312_320 + 312_576
    (fresh,) = plan_job(_job([dpo]), config, GPUS["h200"])
    assert fresh.parameters == 4_001_024
    assert fresh.flops > 0 and fresh.logits > 0

    one, four = (plan_job(_job([SFT], deepspeed={"zero_stage": 3}, resources={"num_workers": n}), config,
                          GPUS["h100"])[0] for n in (1, 4))
    assert one.weights == 8_002_048 and four.weights == 8_002_048 / 4
    assert four.optimizer == one.optimizer / 4

    (qlora,) = plan_job(_job([SFT], quantization={"bits": 4}), config, GPUS["h100"])
    assert qlora.weights == 2_684_420 + 312_320 * 2


def test_reference_free_stages_hold_no_reference():
    """ORPO and SimPO after SFT hold the policy and its adapter only (4,001,024), where DPO after SFT also
    holds the frozen copy of the SFT adapter (312,320 more); their passes are DPO's without the frozen one,
    so they take two thirds of its flops (6 of 8 per parameter and token)."""
    config = LlamaConfig(**TINY)
    stages = [{"type": kind, "data": {"path": "p.jsonl"}, "max_length": 64} for kind in ("dpo", "orpo", "simpo")]
    dpo, orpo, simpo = (plan_job(_job([SFT, stage]), config, GPUS["h200"])[1] for stage in stages)
    assert dpo.parameters == 4_313_344
    assert orpo.parameters == simpo.parameters == 4_001_024
    assert orpo.tokens == simpo.tokens == dpo.tokens
    assert orpo.flops == simpo.flops == pytest.approx(dpo.flops * 6 / 8, rel=0.01)


def test_kto_is_planned_as_dpo_is():
    """A KTO row runs like a DPO pair (its completion and the mismatched one for the KL estimate, after one
    prompt) against the same reference: the frozen copy of the SFT adapter, or a table computed once."""
    config = LlamaConfig(**TINY)
    plans = {}
    for kind in ("dpo", "kto"):
        for reference in ("live", "precomputed"):
            stage = {"type": kind, "data": {"path": "p.jsonl"}, "max_length": 64, "reference": reference}
            plans[kind, reference] = plan_job(_job([SFT, stage]), config, GPUS["h200"])[1]
    for reference in ("live", "precomputed"):
        dpo, kto = plans["dpo", reference], plans["kto", reference]
        assert (kto.parameters, kto.tokens, kto.flops) == (dpo.parameters, dpo.tokens, dpo.flops)
    assert plans["kto", "live"].parameters == 4_313_344 and plans["kto", "precomputed"].parameters == 4_001_024


def test_a_preference_stage_scoring_its_replies_with_a_reward_model_holds_it():
    """`eval_reward: model` loads the job's reward model beside the policy, frozen: DPO after SFT and an RM stage
    holds what it held without it plus that reward model, as GRPO holds its reward model."""
    config = LlamaConfig(**TINY)
    rm = {"type": "rm", "data": {"path": "p.jsonl"}}
    stage = {"type": "dpo", "data": {"path": "p.jsonl", "eval_fraction": 0.1}, "max_length": 64, "max_new_tokens": 8}
    plain = plan_job(_job([SFT, rm, stage]), config, GPUS["h200"])[2]
    scored = plan_job(_job([SFT, rm, {**stage, "eval_reward": "model"}]), config, GPUS["h200"])[2]
    grpo = {"type": "grpo", "data": {"path": "q.jsonl"}, "reward": "model", "max_length": 64, "max_new_tokens": 8}
    grpo_plan = plan_job(_job([SFT, rm, grpo]), config, GPUS["h200"])[2]
    grpo_plain = plan_job(_job([SFT, rm, {**grpo, "reward": "exact_answer"}]), config, GPUS["h200"])[2]
    assert scored.parameters - plain.parameters == grpo_plan.parameters - grpo_plain.parameters > 0


def test_online_stages_hold_a_kv_cache_and_time_the_sampling():
    """GRPO, 8 prompts x 8 samples, prompts of 64 - 4 = 60, 4 new tokens: a KV cache of 64 rows of 64
    positions (16,777,216 bytes in bf16), trained tokens 8 x 60 + 64 x 4 = 736. Sampling 4 tokens takes at
    least 4 steps x 4 layers x 2 ms on a GPU = 32 ms."""
    grpo = {"type": "grpo", "reward": "exact_answer", "data": {"path": "q.jsonl"}, "max_length": 64,
            "max_new_tokens": 4, "group_size": 8, "batch_size": 8}
    (plan,) = plan_job(_job([grpo]), LlamaConfig(**TINY), GPUS["h100"])
    assert plan.kv_cache == 16_777_216
    assert plan.tokens == 736
    assert plan.generation_seconds == pytest.approx(0.032)
    assert plan.step_seconds > plan.generation_seconds


def test_fit_against_the_resources():
    """On a CPU the ranks share its RAM: 2 ranks on 2 GiB have 1 GiB each, and the 0.7 GiB runtime plus
    a full fine-tuning's 3,688,704 x 16 bytes of model states fits; a 0.6 GiB machine does not. Without
    the machine's memory nothing is said."""
    job = _job([SFT], adapter={"type": "full"}, resources={"num_workers": 2}, deepspeed={"precision": "fp32"})
    (fits,) = plan_job(job, LlamaConfig(**TINY), cpu_device(2 * GiB))
    assert fits.budget == GiB and fits.fits
    assert fits.weights + fits.gradients + fits.optimizer == 3_688_704 * 16
    (tight,) = plan_job(job, LlamaConfig(**TINY), cpu_device(0.6 * GiB))
    assert tight.fits is False
    (unknown,) = plan_job(job, LlamaConfig(**TINY))
    assert unknown.device == "cpu" and unknown.fits is None


# --- the command ----------------------------------------------------------------------------------------


def test_align_plan_prints_the_numbers_of_an_example():
    """``align plan examples/tiny-sft-grpo.yaml --gpu h100``: the SFT row is the one worked out in
    test_sft_stage_by_hand; the GRPO row holds the 16 MiB KV cache."""
    from typer.testing import CliRunner

    from align.cli import app

    spec = str(REPO / "examples" / "tiny-sft-grpo.yaml")
    result = CliRunner().invoke(app, ["plan", spec, "--gpu", "h100", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["parameters"] == 3_688_704
    sft, grpo = report["stages"]
    assert (sft["name"], sft["weights"], sft["total"], sft["fits"]) == ("sft", 8_002_048, 1_134_219_776, True)
    assert (grpo["name"], grpo["kv_cache"], grpo["tokens"]) == ("grpo", 16_777_216, 736)
    assert any("30%" in line for line in report["assumptions"])

    table = CliRunner().invoke(app, ["plan", spec, "--gpu", "h100"])
    assert table.exit_code == 0, table.output
    lines = [line for line in table.stdout.splitlines() if line.startswith(("sft ", "grpo "))]
    rows = {line.split()[0]: line.split("│") for line in lines}
    assert [cell.strip() for cell in rows["sft"][2:4]] == ["7.6M", "4.2M"]  # 8,002,048 and 4,372,480 bytes
    assert rows["sft"][7].strip() == "1.06G"  # 1,134,219,776 bytes
    assert rows["grpo"][6].strip() == "16.0M"


def test_align_plan_reads_a_model_config_and_refuses_what_it_cannot_plan(tmp_path):
    """A local base model's config.json is read (never its weights); an artifact base model needs
    --model-config; a plan that does not fit exits 1."""
    from typer.testing import CliRunner

    from align.cli import app

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    spec = tmp_path / "job.yaml"
    spec.write_text("name: big\nbase_model: model\nresources: {gpus_per_worker: 1}\n"
                    "stages: [{type: sft, data: {path: d.jsonl}, batch_size: 4096, max_length: 4096}]\n")
    result = CliRunner().invoke(app, ["plan", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    (stage,) = json.loads(result.stdout)["stages"]
    assert stage["device"] == "h100" and stage["fits"] is False
    printed = CliRunner().invoke(app, ["plan", str(spec)])
    assert printed.exit_code == 1
    # What would fit: a batch of 4096 sequences of 4096 tokens fits an H100 only as smaller micro-batches.
    assert "stages[0]: sft needs about" in printed.output and "batch_size:" in printed.output

    spec.write_text(spec.read_text().replace("base_model: model", "base_model: artifact:other.sft-v1"))
    refused = CliRunner().invoke(app, ["plan", str(spec)])
    assert refused.exit_code == 2 and "--model-config" in refused.output
    accepted = CliRunner().invoke(app, ["plan", str(spec), "--model-config", str(model / "config.json"), "--json"])
    assert accepted.exit_code == 0, accepted.output
