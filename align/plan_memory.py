"""Memory accounting of one training rank, as pure functions of the model's shape and the job's settings.

Every function here returns bytes (or a parameter count) and reads nothing but its arguments; the
stage plans of :mod:`align.plan` add them up. The sources:

- model states (weights, gradients, Adam moments, fp32 master weights) and how ZeRO stages 1-3
  partition them: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", Section 3.1 (mixed-precision Adam: 2 + 2 + 12 = 16 bytes per parameter);
- activations of a transformer layer: Korthikanti et al. 2022, "Reducing Activation Recomputation in
  Large Transformer Models", Eq. 1 (``s·b·h·(34 + 5·a·s/h)`` bytes in 16-bit, no recomputation);
- 4-bit NormalFloat and its quantisation constants: Dettmers et al. 2023, "QLoRA", Section 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GiB = 1024**3

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose parameters :class:`ModelShape` counts exactly; others are counted as Llama."""
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of one Llama-style decoder layer, as peft's ``target_modules`` name them."""

IA3_TARGETS = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
}
"""IA3's targets for ``target_modules: all-linear`` by model type, as peft maps them
(``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``; tests/unit/test_plan.py checks they agree)."""
IA3_FEEDFORWARD = ("down_proj",)
"""The targets whose input IA3 rescales (peft's feed-forward modules); every other target rescales its output."""

NF4_BLOCK = 64
"""Weights per 4-bit quantisation block (bitsandbytes' default): one absmax constant each."""
DOUBLE_QUANT_BLOCK = 256
"""Absmax constants per block of the second quantisation (QLoRA's double quantisation)."""
ZERO_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` (elements): ZeRO-1 and -2 allocate one contiguous
gradient bucket of this size in the gradient dtype when the first backward starts."""
LOGPROB_CHUNK = 1 << 26
"""Elements of one float32 working chunk of :func:`align.ops.logprobs.token_logprobs`."""
ACTIVATION_COEFFICIENT = 34
"""Korthikanti et al. 2022, Eq. 1: bytes per token per hidden unit a layer keeps for backward in 16-bit
(attention 11, MLP 19, two norms 4), besides the attention-score term."""
ATTENTION_SCORE_BYTES = 5
"""Korthikanti et al. 2022, Eq. 1: bytes per attention score a layer keeps when attention is computed
unfused (scores 2, softmax 2, dropout mask 1), for every head and every (query, key) pair."""


class PlanError(ValueError):
    """A model config or spec the planner cannot account for; the message says which field and why."""


@dataclass(frozen=True)
class Linear:
    """One linear layer: ``in_features`` to ``out_features``, with or without a bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """What the accounting needs of a Llama-style decoder (Llama, Mistral, Qwen2, Qwen3)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2; Llama and Qwen3 with ``attention_bias``)."""
    output_bias: bool = False
    """A bias on the attention output projection (Llama and Qwen3 with ``attention_bias``)."""
    mlp_bias: bool = False
    qk_norm: bool = False
    """RMSNorms of ``head_dim`` on queries and keys in every layer (Qwen3)."""
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a transformers config (a ``PretrainedConfig`` or anything with its attributes);
        a multimodal config's ``text_config`` is read when it has one."""
        config = getattr(config, "text_config", None) or config
        missing = [name for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size") if getattr(config, name, None) is None]
        if missing:
            raise PlanError(f"model config: no {', '.join(missing)}; the planner reads Llama-style decoder configs")
        model_type = getattr(config, "model_type", None) or "llama"
        heads = int(config.num_attention_heads)
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            intermediate_size=int(config.intermediate_size),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            output_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            model_type=model_type,
        )

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values) of one token in one layer: ``kv_heads x head_dim``."""
        return self.num_kv_heads * self.head_dim

    def layer_linears(self) -> tuple[Linear, ...]:
        """The linear layers of one decoder layer, in :data:`LAYER_LINEARS` order."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.kv_dim, self.intermediate_size
        return (
            Linear("q_proj", h, q, self.qkv_bias),
            Linear("k_proj", h, kv, self.qkv_bias),
            Linear("v_proj", h, kv, self.qkv_bias),
            Linear("o_proj", q, h, self.output_bias),
            Linear("gate_proj", h, i, self.mlp_bias),
            Linear("up_proj", h, i, self.mlp_bias),
            Linear("down_proj", i, h, self.mlp_bias),
        )

    def layer_parameters(self) -> int:
        """One decoder layer: its linears, two RMSNorms of ``hidden`` (and Qwen3's q/k norms)."""
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return sum(linear.parameters for linear in self.layer_linears()) + norms

    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    def body_parameters(self) -> int:
        """Embeddings, every decoder layer and the final norm: the model without its output head."""
        return self.embedding_parameters() + self.num_layers * self.layer_parameters() + self.hidden_size

    def head_parameters(self, head: str) -> int:
        """The output head: ``lm`` (``vocab x hidden``, none when tied to the embeddings) or ``score``
        (the reward model's and critic's ``hidden x 1``)."""
        if head == "score":
            return self.hidden_size
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    def parameters(self, head: str = "lm") -> int:
        """Every parameter of the causal LM (``head="lm"``) or the one-label sequence classifier (``"score"``)."""
        return self.body_parameters() + self.head_parameters(head)


def _targeted(shape: ModelShape, target_modules: str | Sequence[str]) -> list[Linear]:
    """The linear layers of one decoder layer that ``target_modules`` names (``all-linear``: every one)."""
    linears = shape.layer_linears()
    if target_modules == "all-linear":
        return list(linears)
    unknown = [name for name in target_modules if name not in LAYER_LINEARS]
    if unknown:
        raise PlanError(f"adapter.target_modules: {', '.join(unknown)} not counted; the planner knows "
                        f"all-linear and {', '.join(LAYER_LINEARS)}")
    return [linear for linear in linears if linear.name in target_modules]


def adapter_parameters(shape: ModelShape, adapter: Any, head: str = "lm") -> int:
    """Trainable parameters of ``adapter`` (an :class:`align.spec.AdapterSpec`) on the model with ``head``.

    LoRA puts ``A`` (r x in) and ``B`` (out x r) beside every targeted linear: ``r·(in + out)``; DoRA
    adds a magnitude vector of ``out``. IA3 learns one vector per targeted linear: ``in`` for a feed-forward
    module (:data:`IA3_FEEDFORWARD`), ``out`` for the others. On a reward model or critic (``head="score"``)
    peft also trains a copy of the scalar head (``modules_to_save``): ``hidden``; bias training trains that
    head too. Full fine-tuning trains every parameter, bias training every linear layer's bias. Prefix tuning
    learns a key and a value per virtual token in every layer, ``2·kv_dim`` each (peft sizes them for the
    key-value heads); prompt tuning one input embedding per virtual token, ``hidden``.
    """
    if adapter.type == "full":
        return shape.parameters(head)
    head_copy = shape.head_parameters("score") if head == "score" else 0
    if adapter.type == "prefix":
        return adapter.num_virtual_tokens * shape.num_layers * 2 * shape.kv_dim + head_copy
    if adapter.type == "prompt":
        return adapter.num_virtual_tokens * shape.hidden_size + head_copy
    if adapter.type == "bias":
        biases = sum(linear.out_features for linear in shape.layer_linears() if linear.bias)
        return shape.num_layers * biases + head_copy
    if adapter.type == "ia3":
        targets = adapter.target_modules
        if targets == "all-linear":
            targets = IA3_TARGETS.get(shape.model_type, IA3_TARGETS["llama"])
        per_layer = sum(linear.in_features if linear.name in IA3_FEEDFORWARD else linear.out_features
                        for linear in _targeted(shape, targets))
        return shape.num_layers * per_layer + head_copy
    per_layer = sum(
        adapter.r * (linear.in_features + linear.out_features) + (linear.out_features if adapter.type == "dora" else 0)
        for linear in _targeted(shape, adapter.target_modules)
    )
    return shape.num_layers * per_layer + head_copy


def quantized_bytes_per_weight(quantization: Any) -> float:
    """Bytes per weight of a quantised linear layer (an :class:`align.spec.QuantizationSpec`), constants
    included, the per-row scale of 8-bit aside (:func:`weight_bytes` adds it).

    4-bit: half a byte, plus one absmax per 64 weights: a float32 (4/64 = 0.0625 B), or with double
    quantisation an 8-bit constant (1/64) and a float32 per 256 of those (4/(64·256)): 0.0159 B, the
    QLoRA paper's 0.127 bits per parameter. 8-bit: one byte.
    """
    if quantization.bits == 8:
        return 1.0
    if quantization.double_quant:
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
    return 0.5 + 4 / NF4_BLOCK


def weight_bytes(shape: ModelShape, dtype_bytes: int, quantization: Any = None, head: str = "lm") -> float:
    """Bytes of the model's own weights (no adapter) in ``dtype_bytes`` per parameter.

    With ``quantization`` the linear layers of the decoder layers hold quantised weights
    (:func:`quantized_bytes_per_weight`; 8-bit adds a float32 scale per output row); their biases, the
    norms, the embeddings and the output head stay in ``dtype_bytes``, as bitsandbytes through
    transformers leaves them.
    """
    if quantization is None:
        return shape.parameters(head) * dtype_bytes
    linears = shape.layer_linears()
    quantized = shape.num_layers * sum(linear.in_features * linear.out_features for linear in linears)
    row_scales = shape.num_layers * sum(linear.out_features for linear in linears) * 4 if quantization.bits == 8 else 0
    kept = shape.parameters(head) - quantized
    return quantized * quantized_bytes_per_weight(quantization) + row_scales + kept * dtype_bytes


@dataclass(frozen=True)
class ModelStates:
    """Bytes of a rank's training state for its trainable parameters, besides the weights themselves."""

    gradients: float
    """The 16-bit (bf16) or 32-bit (fp32) gradients on the device."""
    optimizer: float
    """Adam's two moments in fp32, and in bf16 the fp32 master weights, on the device."""
    offloaded: float
    """What ``offload_optimizer`` keeps in host memory instead: the optimizer states and a float32
    copy of the rank's gradient partition that CPU Adam steps on."""
    buckets: float
    """ZeRO's gradient buckets (ZeRO-1/2: one of :data:`ZERO_REDUCE_BUCKET` elements; ZeRO-3: two
    of ``hidden²``, as ``align.engine.build.zero3_buckets`` sets)."""
    step: float
    """Held only while the optimizer steps: the float32 copy of the (partitioned) bf16 gradients."""


def model_state_bytes(
    trainable: int, precision: str, zero_stage: int, world_size: int, offload: bool, on_gpu: bool, hidden_size: int
) -> ModelStates:
    """Gradients and AdamW states of ``trainable`` parameters on one of ``world_size`` ranks.

    bf16 (mixed precision, ZeRO Section 3.1): a 2-byte gradient, and 12 bytes of optimizer state (fp32
    master weight 4, first moment 4, second moment 4); with the 2-byte weight, 16 bytes a parameter.
    fp32: a 4-byte gradient and 8 bytes of moments; the weights are their own master copy, so with
    the 4-byte weight again 16 bytes a parameter. ZeRO-1 divides the optimizer states by the world size,
    ZeRO-2 the gradients too (ZeRO-3 also the weights: :func:`align.plan` divides those).

    Buckets: a GPU's caching allocator holds the whole ZeRO-1/2 bucket; on a CPU only the pages the
    gradients are written to count, at most the trainable parameters.
    """
    grad_bytes, state_bytes = (2, 12) if precision == "bf16" else (4, 8)
    gradients = trainable * grad_bytes / (world_size if zero_stage >= 2 else 1)
    optimizer = trainable * state_bytes / (world_size if zero_stage >= 1 else 1)
    offloaded = 0.0
    if offload and zero_stage >= 1:
        offloaded = optimizer + trainable * 4 / world_size
        optimizer = 0.0
    if zero_stage in (1, 2):
        buckets = (ZERO_REDUCE_BUCKET if on_gpu else min(ZERO_REDUCE_BUCKET, trainable)) * grad_bytes
    elif zero_stage == 3:
        buckets = 2 * hidden_size * hidden_size * grad_bytes
    else:
        buckets = 0.0
    step = trainable * 4 / (world_size if zero_stage >= 1 else 1) if precision == "bf16" and not offload else 0.0
    return ModelStates(gradients, optimizer, offloaded, buckets, step)


@dataclass(frozen=True)
class Pass:
    """One forward over a micro-batch: ``sequences`` sequences of ``queries`` new tokens each, attending
    over ``keys`` positions each (``queries`` plus a cached prefix), of which ``scored`` positions in all
    are projected to the vocabulary."""

    sequences: int
    queries: int
    keys: int
    scored: int

    @property
    def tokens(self) -> int:
        return self.sequences * self.queries


def layer_activation_bytes(work: Pass, shape: ModelShape, dtype_bytes: int, fused_attention: bool = True) -> float:
    """Bytes one decoder layer keeps for its backward pass over ``work``, without recomputation.

    Korthikanti et al. 2022, Eq. 1, per layer in 16-bit: ``s·b·h·34 + 5·a·s²·b``. With sequences of
    their own lengths the first term is ``34·h`` per token and the second ``5·a`` per (query, key) pair
    of each sequence. The second term is the score matrix, its softmax and its dropout mask, which only
    unfused (eager) attention keeps; fused kernels (sdpa: flash or memory-efficient, which align's
    models and its packed attention use) keep a float32 log-sum-exp per head and query instead.
    fp32 doubles the 16-bit terms.

    A pass that reads a cached prefix (``keys > queries``: GRPO's completions over their shared prompt's
    KV cache, repeated for the group) also keeps that prefix's keys and values in the graph.
    """
    per_token = ACTIVATION_COEFFICIENT * shape.hidden_size * work.tokens * dtype_bytes / 2
    prefix = 2 * shape.kv_dim * work.sequences * (work.keys - work.queries) * dtype_bytes
    if fused_attention:
        return per_token + prefix + 4 * shape.num_heads * work.tokens
    pairs = work.sequences * work.queries * work.keys
    return per_token + prefix + ATTENTION_SCORE_BYTES * shape.num_heads * pairs * dtype_bytes / 2


def activation_bytes(
    passes: Sequence[Pass], shape: ModelShape, dtype_bytes: int, checkpointing: bool, fused_attention: bool = True
) -> float:
    """Bytes held for backward by the passes of one micro-batch whose gradients are taken together.

    Without recomputation every layer keeps :func:`layer_activation_bytes`. With gradient checkpointing
    each layer keeps only its input (``tokens x hidden`` in the training dtype) and one layer's full
    activations exist at a time, while it is recomputed in the backward pass.
    """
    per_layer = sum(layer_activation_bytes(p, shape, dtype_bytes, fused_attention) for p in passes)
    if not checkpointing:
        return shape.num_layers * per_layer
    inputs = sum(p.tokens for p in passes) * shape.hidden_size * dtype_bytes
    return shape.num_layers * inputs + per_layer


def logits_bytes(positions: int, vocab_size: int, dtype_bytes: int, trained: bool) -> float:
    """Bytes of the vocabulary projection of ``positions`` positions and its log-probabilities.

    The logits stay in the training dtype for the backward of :func:`align.ops.logprobs.token_logprobs`,
    and the backward makes their gradient of the same size (``trained``); the log-softmax itself runs in
    float32 chunks of at most :data:`LOGPROB_CHUNK` elements (two of them from bf16 logits: the
    upcast and its exponential).
    """
    elements = positions * vocab_size
    held = elements * dtype_bytes * (2 if trained else 1)
    chunk = min(elements, LOGPROB_CHUNK) * 4 * (2 if dtype_bytes == 2 else 1)
    return held + chunk


def entropy_bytes(positions: int, vocab_size: int, dtype_bytes: int) -> float:
    """Bytes :func:`align.losses.ppo.entropy_from_logits` adds over the logits it reads: a float32 copy
    (none when they are float32 already), the softmax, and their product."""
    return positions * vocab_size * ((4 if dtype_bytes == 2 else 0) + 4 + 4)


def kv_cache_bytes(sequences: int, positions: int, shape: ModelShape, dtype_bytes: int) -> float:
    """Bytes of a KV cache of ``sequences`` rows of ``positions`` positions: keys and values of
    ``kv_heads x head_dim`` per token in every layer (grouped-query attention shares them across heads)."""
    return 2 * shape.num_layers * shape.kv_dim * sequences * positions * dtype_bytes
