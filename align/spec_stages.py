"""The stages of a job spec: SFT, reward model, DPO, ORPO, SimPO and KTO train on fixed rows; PPO, GRPO
and RLOO sample from the policy while they train.

``StageSpec`` is the union a job's ``stages`` list holds, told apart by each stage's ``type``.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

from align.spec_parts import MAX_STEPS, MAX_TOKENS, DataSpec, ResourcesSpec, SpecModel

STAGE_TYPES = ("sft", "rm", "dpo", "orpo", "simpo", "kto", "ppo", "grpo", "rloo")
POLICY_STAGE_TYPES = ("sft", "dpo", "orpo", "simpo", "kto", "ppo", "grpo", "rloo")
"""Stages that leave a policy: the next stage starts from the latest of them."""
ONLINE_STAGE_TYPES = ("ppo", "grpo", "rloo")
"""Stages that sample from the policy while they train."""
PAIR_STAGE_TYPES = ("dpo", "orpo", "simpo")
"""Policy stages that train on preference pairs."""
RewardName = Literal["exact_answer"]
"""Reward functions a stage may name; ``align.rewards.REWARDS`` maps each to its function."""
MODEL_REWARD = "model"
"""The ``reward`` of an online stage that scores with a reward model."""
RewardChoice = Literal["model", "exact_answer"]
"""What an online stage's ``reward`` may name: the reward model or a reward function."""
if get_args(RewardChoice) != (MODEL_REWARD, *get_args(RewardName)):
    raise RuntimeError("RewardChoice must be 'model' followed by the RewardName functions")

_PAIR_REWARDS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")
GENERATION_METRICS = ("eval_reward_mean", "eval_win_rate")
"""What a stage that scores its replies to the held-out prompts reports (``align.evaluate_generations``)."""
DEFAULT_GATE_METRIC = "eval_win_rate"
"""The metric of a `gate` that names none, on a stage that scores its replies to the held-out prompts."""
_PAIR_HELD_OUT = ("eval_logp_accuracy", "eval_exact_match", *GENERATION_METRICS)
_ONLINE = ("reward_mean", "kl", "response_length", "eval_exact_match")
_ORPO = ("loss", "nll_loss", "odds_ratio_loss", "log_odds_ratio", *_PAIR_REWARDS)
_SIMPO = ("loss", "simpo_loss", "nll_loss", *_PAIR_REWARDS)
_KTO = ("loss", "kl", "rewards_desirable", "rewards_undesirable", "rewards_accuracy")
FINAL_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("loss", "eval_loss", "eval_exact_match"),
    "rm": ("loss", "accuracy", "margin", "reward_mean", "eval_loss", "eval_accuracy", "eval_margin"),
    "dpo": ("loss", "dpo_loss", "nll_loss", *_PAIR_REWARDS, "eval_loss", "eval_dpo_loss", "eval_nll_loss",
            "eval_rewards_accuracy", "eval_rewards_margin", *_PAIR_HELD_OUT),
    "orpo": (*_ORPO, *(f"eval_{key}" for key in _ORPO), *_PAIR_HELD_OUT),
    "simpo": (*_SIMPO, *(f"eval_{key}" for key in _SIMPO), *_PAIR_HELD_OUT),
    "kto": (*_KTO, *(f"eval_{key}" for key in _KTO), "eval_exact_match", *GENERATION_METRICS),
    "ppo": (*_ONLINE, "reward_std", "kl_coef", "policy_loss", "value_loss", *GENERATION_METRICS, "eval_reward_std",
            "eval_prompt_reward_std", "eval_kl"),
    "grpo": ("loss", "accuracy", *_ONLINE, *GENERATION_METRICS),
    "rloo": ("loss", "accuracy", *_ONLINE, *GENERATION_METRICS),
}
"""The final metrics each stage type's artifact records (the last logged value of each; `eval_` ones come
from the held-out data), besides throughput and counts. A stage's `gate` may name any of them."""
STARTING_EVALUATION_TYPES = ("dpo", "orpo", "simpo", "kto", "ppo", "grpo", "rloo")
"""Stages that evaluate their starting policy on the held-out data before the first step (step 0)."""


class GateSpec(SpecModel):
    """A condition on a stage's final metric that must hold for the job to go on. The stage's artifact is
    published either way; when the condition fails the stage ends `failed` with error code `failed_gate`
    and the reason, and the stages after it never start."""

    metric: str | None = Field(None, max_length=100)
    """One of the final metrics the stage type reports, e.g. `eval_rewards_accuracy` or `eval_exact_match`.
    Unset: `eval_win_rate`, on a stage that scores its replies to the held-out prompts (dpo, orpo, simpo and kto
    with `eval_reward`; ppo, grpo and rloo always); a stage that does not must name a metric."""
    min: float | None = Field(None, ge=-1e12, le=1e12)
    """The metric must be at least this."""
    max: float | None = Field(None, ge=-1e12, le=1e12)
    """The metric must be at most this (for losses)."""
    min_delta_vs_parent: float | None = Field(None, ge=-1e12, le=1e12)
    """The metric must beat the parent policy's by at least this much (0: not worse). The parent's value
    is the stage's own step-0 evaluation of its starting policy on the same held-out data (dpo, orpo,
    simpo, ppo, grpo, rloo); for sft and rm stages, which do not evaluate before training, it is the
    same metric in the parent artifact's manifest."""

    @model_validator(mode="after")
    def _some_condition(self) -> GateSpec:
        if self.min is None and self.max is None and self.min_delta_vs_parent is None:
            named = f"names metric '{self.metric}' but" if self.metric else "sets"
            raise ValueError(f"{named} no condition; set min, max or min_delta_vs_parent")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min: {self.min:g} is above max ({self.max:g}), so no value can pass; "
                             "lower min or raise max")
        return self


class _StageBase(SpecModel):
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    """Stage name, unique in the job (default `<type>` or `<type>-<index>` when a type repeats)."""
    data: DataSpec
    """Where the stage's rows come from."""
    epochs: float = Field(1.0, gt=0, le=10_000)
    """Passes over the training rows. Ignored when `max_steps` is set."""
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    """Optimizer steps to train for; overrides `epochs`."""
    lr: float = Field(2e-4, gt=0, le=1.0)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up: cosine or linear to zero, or constant."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the steps spent warming the learning rate up linearly from zero."""
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    """AdamW decoupled weight decay."""
    batch_size: int = Field(8, ge=1, le=65_536)
    """Rows per micro-batch on each worker (pairs for rm, dpo, orpo and simpo)."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=65_536)
    """Micro-batches per optimizer step. Global batch = batch_size x gradient_accumulation_steps x num_workers."""
    max_length: int = Field(512, ge=8, le=MAX_TOKENS)
    """Longest tokenised sequence (prompt plus response)."""
    truncation: Literal["right", "left", "drop"] = "right"
    """Over-long rows: `right` cuts the end, `left` cuts the start of the prompt, `drop` skips the row."""
    eval_every: int | None = Field(None, ge=1, le=MAX_STEPS)
    """Evaluate on the held-out rows every this many steps (always once at the end)."""
    eval_exact_match: bool = False
    """Also generate greedy answers for held-out prompts and report exact-match accuracy against the reference."""
    checkpoint_every: int | None = Field(50, ge=1, le=MAX_STEPS)
    """Save a resumable checkpoint every this many steps (unset: only at the end)."""
    log_every: int = Field(1, ge=1, le=MAX_STEPS)
    """Write step metrics every this many steps."""
    seed: int = Field(42, ge=0, le=2**31 - 1)
    """Seeds data order, adapter initialisation and dropout."""
    resources: ResourcesSpec | None = None
    """This stage's workers in place of the job's `resources` (the same fields), e.g. SFT on 8 GPUs, then the
    reward model on 2. Unset: the job's."""
    gate: GateSpec | None = None
    """A condition on the stage's final metrics for the job to go on, e.g. `{metric: eval_rewards_accuracy,
    min: 0.6}` or `{metric: eval_exact_match, min_delta_vs_parent: 0.0}` (see Gate below)."""

    @property
    def scores_generations(self) -> bool:
        """Whether the stage samples replies to its held-out prompts and scores them (`eval_reward_mean`,
        `eval_win_rate`)."""
        return False

    @model_validator(mode="after")
    def _gate_metric_is_reported(self):
        gate = self.gate
        if gate is None:
            return self
        if gate.metric is None:
            if not self.scores_generations:
                can_score = "eval_reward" in type(self).model_fields
                scorer = " or set eval_reward (model or exact_answer)" if can_score else ""
                raise ValueError(f"gate.metric: a {self.type} stage that does not score its replies to held-out "
                                 f"prompts has no default metric ({DEFAULT_GATE_METRIC}); name one{scorer}")
            # The model is frozen: the gate with its metric filled replaces the one given.
            object.__setattr__(self, "gate", gate.model_copy(update={"metric": DEFAULT_GATE_METRIC}))
            gate = self.gate
        reported = FINAL_METRICS[self.type]
        if gate.metric not in reported:
            raise ValueError(f"gate.metric: a {self.type} stage does not report '{gate.metric}'; use one of "
                             f"{', '.join(reported)}")
        if gate.metric.startswith("eval_") and self.data.eval_path is None and not self.data.eval_fraction:
            raise ValueError(f"gate.metric: '{gate.metric}' is measured on held-out data and this stage has none; "
                             "set data.eval_path or data.eval_fraction")
        if gate.metric == "eval_exact_match" and not self.eval_exact_match:
            raise ValueError("gate.metric: 'eval_exact_match' is only measured with eval_exact_match: true; "
                             "set it or gate on another metric")
        if gate.metric in GENERATION_METRICS and not self.scores_generations:
            raise ValueError(f"gate.metric: '{gate.metric}' is only measured with eval_reward set; set eval_reward "
                             "(model or exact_answer) or gate on another metric")
        return self


class SFTStage(_StageBase):
    """Supervised fine-tuning on demonstrations; loss only on assistant tokens."""

    type: Literal["sft"]
    """`sft`."""
    padding_free: bool = True
    """Pack each micro-batch's sequences end to end in one row, with no padding: attention stays within
    each sequence and only the scored positions are projected to the vocabulary. `false` pads every
    sequence to the longest of its micro-batch. Models whose attention cannot switch (anything not on
    transformers' `sdpa`) are padded either way, with a message."""


class RewardModelStage(_StageBase):
    """Bradley-Terry reward model: a scalar head on the policy, trained on preference pairs."""

    type: Literal["rm"]
    """`rm`."""
    max_prompt_length: int | None = Field(None, ge=1, le=MAX_TOKENS)
    """Longest prompt; longer prompts lose their start."""
    init: Literal["policy", "base"] = "policy"
    """Start from the current policy (the SFT model, as in InstructGPT) or from the base model."""
    lr: float = Field(5e-5, gt=0, le=1.0)
    """Peak learning rate."""


class _PairStage(_StageBase):
    """What the policy stages that train on preference pairs share."""

    max_prompt_length: int | None = Field(None, ge=1, le=MAX_TOKENS)
    """Longest prompt; longer prompts lose their start."""
    lr: float = Field(5e-5, gt=0, le=1.0)
    """Peak learning rate."""
    padding_free: bool = True
    """Pack each micro-batch's sequences end to end in one row, with no padding: attention stays within
    each sequence and only the scored positions are projected to the vocabulary. A pair's prompt is
    encoded once for both replies (prefix sharing). `false` pads every sequence to the longest of its
    micro-batch. Models whose attention cannot switch (anything not on transformers' `sdpa`) are
    padded either way, with a message."""


class _GenerationEval(SpecModel):
    """Settings of the preference stages that sample and score replies to their held-out prompts."""

    eval_reward: RewardChoice | None = None
    """Also sample replies to the held-out prompts at every evaluation and score them: `model` with a reward
    model (see `reward_model`), or a reward function by name from a fixed list: `exact_answer` (1 when the
    reply is exactly the right answer of the built-in parity task, else 0). Reports `eval_reward_mean`, the
    mean score, and `eval_win_rate`, the fraction of held-out prompts where the policy's reply scores above
    the starting policy's (ties count half). The starting policy's replies are sampled and scored at step 0,
    with the sampling seeds of every later evaluation, and their scores kept beside the checkpoints, so a
    resumed stage compares with them too. A `gate` with no metric gates on `eval_win_rate`. Unset: off."""
    reward_model: str | None = Field(None, pattern=r"^artifact:[A-Za-z0-9][A-Za-z0-9._-]*$")
    """With `eval_reward: model`, the reward model to score with, as `artifact:<id>` of an `rm` stage's
    artifact. Unset: the artifact of the latest `rm` stage before this one in the job."""
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    """With `eval_reward`, most tokens sampled per reply (EOS included). Prompts are cut from the left to
    `max_length - max_new_tokens` tokens (and to `max_prompt_length`)."""
    temperature: float = Field(1.0, gt=0, le=4.0)
    """With `eval_reward`, the temperature the replies are sampled at (from the whole distribution)."""
    eval_samples: int = Field(1, ge=1, le=64)
    """With `eval_reward`, replies sampled per held-out prompt; a prompt's win is then the fraction of
    (reply, starting policy's reply) pairs the reply wins."""

    @property
    def scores_generations(self) -> bool:
        return self.eval_reward is not None

    @model_validator(mode="after")
    def _generation_settings(self):
        if self.reward_model is not None and self.eval_reward != MODEL_REWARD:
            given = f", not '{self.eval_reward}'" if self.eval_reward else ", which is unset"
            raise ValueError(f"reward_model: only used with eval_reward '{MODEL_REWARD}'{given}; "
                             f"set eval_reward: {MODEL_REWARD} or drop reward_model")
        if self.eval_reward is None:
            return self
        if self.data.eval_path is None and not self.data.eval_fraction:
            raise ValueError("eval_reward: scores replies to held-out prompts and this stage has none; set "
                             "data.eval_path or data.eval_fraction, or drop eval_reward")
        if self.max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens} must be below max_length ({self.max_length}), "
                             "which holds the prompt and the sampled reply; lower max_new_tokens or raise max_length")
        return self


class DPOStage(_GenerationEval, _PairStage):
    """Direct Preference Optimization against the frozen starting policy."""

    type: Literal["dpo"]
    """`dpo`."""
    beta: float = Field(0.1, gt=0, le=1e6)
    """Strength of the implicit KL penalty to the reference."""
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """`sigmoid` (DPO; with label smoothing: conservative DPO), `ipo`, `hinge` (SLiC) or `robust` (rDPO).
    `ipo` is Azar et al. 2023 (IPO), Eq. 17, on log-probs averaged over each response's tokens, the
    form the IPO authors and TRL use (on summed log-probs the margin grows with response length and
    the loss with it); the logged implicit rewards stay on summed log-probs for every loss."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Assumed fraction ε of flipped labels, for `sigmoid` (cDPO) and `robust` (rDPO). With `sigmoid`
    align keeps the cDPO paper's form (Mitchell 2023), `-(1-ε)·log σ(βh) - ε·log σ(-βh)` with h the
    chosen-minus-rejected margin of log-ratios to the reference. TRL 1.16's `sigmoid` leaves it
    unused (TRL applies it in `robust`, `exo_pair` and `aot` only), so the same setting there trains
    plain DPO."""
    sft_weight: float = Field(0.0, ge=0.0, le=1e6)
    """Weight α of an added NLL on the chosen responses (RPO, Pang et al. 2024). Each pair's NLL is
    divided by its chosen response's token count and the batch term is the mean over pairs, as for
    the DPO term: every pair weighs the same whatever its length, and the step's loss does not depend
    on how its pairs are split into micro-batches and workers. TRL's RPO (its `sft` loss) averages
    over all chosen tokens of a batch instead, so longer responses weigh more and batch values differ."""
    reference: Literal["live", "precomputed"] = "live"
    """Reference log-probs computed beside each step (`live`) or once before training (`precomputed`)."""

    @model_validator(mode="after")
    def _smoothing_fits_loss(self) -> DPOStage:
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ValueError(
                f"label_smoothing: {self.label_smoothing} only applies to loss 'sigmoid' or 'robust', "
                f"not '{self.loss}': set label_smoothing to 0 or change the loss"
            )
        return self


class ORPOStage(_GenerationEval, _PairStage):
    """Odds-ratio preference optimisation (Hong et al. 2024): the chosen response's NLL plus a penalty
    on the log odds ratio of chosen to rejected, with no reference model."""

    type: Literal["orpo"]
    """`orpo`."""
    beta: float = Field(0.1, gt=0, le=1e6)
    """Weight λ of the odds-ratio term beside the NLL (TRL's `ORPOConfig.beta`)."""


class SimPOStage(_GenerationEval, _PairStage):
    """Simple preference optimisation (Meng et al. 2024): a margin loss on length-normalised
    log-likelihoods, with no reference model."""

    type: Literal["simpo"]
    """`simpo`."""
    beta: float = Field(2.0, gt=0, le=1e6)
    """Reward scale β: the reward of a response is β times its mean log-probability per token (the paper
    uses 2 to 10)."""
    gamma: float = Field(0.5, ge=0.0, le=1e6)
    """Target reward margin γ between chosen and rejected, in reward units (TRL's `simpo_gamma`)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Assumed fraction ε of flipped labels: `-(1-ε)·log σ(m) - ε·log σ(-m)`."""
    sft_weight: float = Field(0.0, ge=0.0, le=1e6)
    """Weight of an added per-token NLL on the chosen responses (CPO-SimPO; TRL's `cpo_alpha`, which
    defaults to 1 there). 0 is plain SimPO."""


class KTOStage(_GenerationEval, _PairStage):
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired rows, each one completion marked
    desirable or undesirable, against the frozen starting policy (as DPO's reference). The reference
    point is the batch's KL estimate from completions paired with other rows' prompts."""

    type: Literal["kto"]
    """`kto`. Its data: TRL's unpaired layout (`prompt`, `completion`, `label`: true for a desirable
    completion, false for an undesirable one), or preference pairs, each giving a desirable row (the chosen
    answer) and an undesirable one (the rejected answer)."""
    beta: float = Field(0.1, gt=0, le=1e6)
    """Strength of the KL constraint to the reference (TRL's `KTOConfig.beta`)."""
    desirable_weight: float = Field(1.0, ge=0, le=1e6)
    """Weight λ_D of the desirable rows' loss. The paper advises `λ_D·n_D / (λ_U·n_U)` between 1 and 4/3 for
    n_D desirable and n_U undesirable rows: raise the weight of the rarer kind."""
    undesirable_weight: float = Field(1.0, ge=0, le=1e6)
    """Weight λ_U of the undesirable rows' loss."""
    reference: Literal["live", "precomputed"] = "live"
    """Reference log-probs computed beside each step (`live`) or once before training (`precomputed`)."""

    @model_validator(mode="after")
    def _some_weight(self) -> KTOStage:
        if not self.desirable_weight and not self.undesirable_weight:
            raise ValueError("desirable_weight and undesirable_weight are both 0, so nothing would be learnt; "
                             "set either above 0")
        return self


class _OnlineStage(_StageBase):
    """What every online RL stage shares: prompts, sampling and the reward."""

    data: DataSpec
    """Prompts to train on (a `prompt` column, or any format a prompt can be taken from). Held-out prompts
    (`eval_path` or `eval_fraction`) are sampled and scored at every evaluation: `eval_reward_mean`, and
    `eval_win_rate` against the starting policy's samples, taken at step 0 with the same seeds and kept beside
    the checkpoints (a `gate` with no metric gates on it); held-out rows with a reference answer
    (`prompt`/`completion`) also give greedy accuracy."""
    reward_model: str | None = Field(None, pattern=r"^artifact:[A-Za-z0-9][A-Za-z0-9._-]*$")
    """With `reward: model`, the reward model to score with, as `artifact:<id>` of an `rm` stage's
    artifact. Unset: the artifact of the latest `rm` stage before this one in the job."""
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    """Most tokens sampled per completion (EOS included). Prompts are cut from the left to
    `max_length - max_new_tokens` tokens."""
    temperature: float = Field(1.0, gt=0, le=4.0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1.0)
    """Nucleus sampling mass; 1 samples from the whole distribution."""
    clip_eps: float = Field(0.2, gt=0, lt=1.0)
    """PPO ratio clip range: the ratio to the sampling policy is clipped to [1 - clip_eps, 1 + clip_eps]."""
    batch_size: int = Field(8, ge=1, le=65_536)
    """Prompts per micro-batch on each worker."""
    lr: float = Field(1e-5, gt=0, le=1.0)
    """Peak learning rate."""

    @property
    def scores_generations(self) -> bool:
        return True

    @model_validator(mode="after")
    def _room_for_completions(self):
        if self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_new_tokens: {self.max_new_tokens} must be below max_length ({self.max_length}), "
                "which holds the prompt and the completion"
            )
        if self.reward_model is not None and self.reward != MODEL_REWARD:
            raise ValueError(
                f"reward_model: only used with reward '{MODEL_REWARD}', not '{self.reward}'; "
                f"set reward: {MODEL_REWARD} or drop reward_model"
            )
        return self


class GRPOStage(_OnlineStage):
    """Critic-free online RL: sample a group of completions per prompt, score them, and push the
    policy towards the better ones (GRPO, Shao et al. 2024; `type: rloo` uses the leave-one-out
    baseline of Ahmadian et al. 2024 instead). The KL to the frozen starting policy is a loss term."""

    type: Literal["grpo", "rloo"]
    """`grpo` (advantage: reward minus the group mean, over the group standard deviation) or `rloo`
    (advantage: reward minus the mean of the other samples of the group)."""
    reward: RewardChoice
    """`model` scores with a reward model (see `reward_model`); or a reward function by name from a
    fixed list: `exact_answer` (1 when the completion is exactly the right answer of the built-in
    parity task, else 0)."""
    group_size: int = Field(8, ge=2, le=256)
    """Completions sampled per prompt; the group is each sample's baseline."""
    kl_coef: float = Field(0.04, ge=0, le=1e6)
    """Weight of the KL to the starting policy (see `kl_penalty`); 0 drops it."""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """Where the KL goes: `loss` adds `kl_coef` times the per-token k3 estimate to the loss (GRPO);
    `reward` subtracts `kl_coef` times the completion's summed k1 estimate from its reward before the
    group advantages are taken (the RLOO paper's form)."""
    batch_size: int = Field(8, ge=1, le=65_536)
    """Prompts per micro-batch on each worker (each brings `group_size` completions)."""
    eval_exact_match: bool = True
    """Generate greedy answers for the held-out prompts and report exact-match accuracy, before
    training and at every evaluation."""


class PPOStage(_OnlineStage):
    """PPO with a learned critic against a reward model, as in InstructGPT (Ouyang et al. 2022): each
    step samples one completion per prompt, scores it, puts a per-token KL penalty to the frozen
    starting policy into the reward, estimates advantages with GAE and takes `ppo_epochs` clipped
    policy and value updates on the batch."""

    type: Literal["ppo"]
    """`ppo`."""
    reward: RewardChoice = "model"
    """`model` scores with a reward model (see `reward_model`); or a reward function by name from a
    fixed list: `exact_answer` (1 when the completion is exactly the right answer of the built-in
    parity task, else 0)."""
    critic_init: Literal["reward_model", "policy"] = "reward_model"
    """Where the critic (value model) starts: the reward model with its head as the value head
    (InstructGPT), or the starting policy with a zero value head. `reward_model` shares the frozen
    reward model's weights and needs `reward: model`."""
    critic_lr: float = Field(5e-5, gt=0, le=1.0)
    """Peak learning rate of the critic."""
    ppo_epochs: int = Field(4, ge=1, le=64)
    """Optimisation passes over each batch of samples; each pass is one optimizer step of the
    policy and one of the critic."""
    kl_coef: float = Field(0.05, ge=0, le=1e6)
    """Weight β of the per-token KL penalty to the starting policy in the reward (its start value
    when `kl_target` is set)."""
    kl_target: float | None = Field(None, gt=0, le=1e6)
    """Adapt β towards this KL per completion (nats, summed over its tokens), by at most ±20% per
    `kl_horizon` samples (Ziegler et al. 2019). Unset: β stays `kl_coef`."""
    kl_horizon: int = Field(10000, ge=1, le=10**12)
    """Samples over which the adaptive β may change by the full ±20%."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate in the reward: `k1` (log-ratio, unbiased, can be negative) or `k3`
    (always ≥ 0, lower variance)."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """GAE discount."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE λ: 1 gives Monte-Carlo returns, 0 one-step TD."""
    value_clip_eps: float = Field(0.2, gt=0, le=1e6)
    """The value estimate may move at most this far from its sampling-time value before the
    clipped value loss stops pulling it."""
    entropy_coef: float = Field(0.0, ge=0.0, le=1e6)
    """Weight of an entropy bonus in the policy loss; 0 switches it off."""
    whiten_advantages: bool = True
    """Normalise the batch's advantages to mean 0 and variance 1 (over all workers)."""
    missing_eos_penalty: float | None = Field(None, ge=0.0, le=1e6)
    """Subtract this from the score of completions cut at `max_new_tokens` before they ended."""
    eval_samples: int = Field(1, ge=1, le=64)
    """Completions sampled per held-out prompt when evaluating the mean reward."""


StageSpec = Annotated[
    SFTStage | RewardModelStage | DPOStage | ORPOStage | SimPOStage | KTOStage | PPOStage | GRPOStage,
    Field(discriminator="type"),
]
