"""What a stage starts from: the policy it continues, the reward model it scores with, and its parents.

One rule for the local runner and the service alike:

- the start policy is the artifact of the latest policy stage (sft, dpo, orpo, simpo, kto, ppo, grpo, rloo) before the
  stage that published one; before any, the policy another job published that ``base_model:
  artifact:<id>`` names (an adapter is continued; full weights are the base a new adapter trains on), and
  none for a job on a plain base model;
- an online stage with ``reward: model``, or a dpo, orpo, simpo or kto stage with ``eval_reward: model``, scores
  with the artifact its ``reward_model: artifact:<id>`` names, else with the artifact of the latest rm stage
  before it; that artifact must be a reward
  model trained on the job's base model (on both sides, the one under ``artifact:<id>`` of an adapter;
  full weights named so are a base model of their own);
- the parents recorded in the stage's manifest are the start policy's id, then the reward model's, so
  lineage crosses jobs: a job's first stage names the artifact its ``base_model`` gave.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from align.artifact_manifest import ARTIFACT_REF_PREFIX, REWARD_MODEL_KIND
from align.spec import MODEL_REWARD, POLICY_STAGE_TYPES, WHOLE_MODEL_ADAPTERS, JobSpec

POLICY_KINDS = ("adapter", "full")
"""Artifact kinds a job may start from (``base_model: artifact:<id>``): policies, not reward models."""


@dataclass(frozen=True)
class InputArtifact:
    """A published artifact as a later stage sees it."""

    artifact_id: str
    uri: str
    kind: str
    """The manifest's kind: ``adapter``, ``model``, ``reward_model`` ..."""
    base_model: str | None = None
    """The base model the artifact's job trained; None when the caller cannot tell (no check is made)."""


class StageInputs(NamedTuple):
    start_policy: str | None
    """URI of the policy the stage starts from."""
    parents: list[str]
    """Artifact ids the stage builds on: the policy, then the reward model."""
    reward_model: str | None
    """URI of the reward model a stage with ``reward: model`` or ``eval_reward: model`` scores with."""


class MissingInput(ValueError):
    """A stage's input artifact is missing or unfit; ``field`` names the spec field that asks for it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def reward_model_problem(artifact_id: str, kind: str, trained_on: str | None, base_model: str) -> str | None:
    """Why the artifact ``artifact_id``, of ``kind``, trained on ``trained_on`` (None: unknown, not checked),
    cannot score a job that trains ``base_model``; None when it can."""
    if kind != REWARD_MODEL_KIND:
        return (f"'{artifact_id}' is an artifact of kind '{kind}', not a reward model; give "
                f"artifact:<id> of an artifact an rm stage published (kind {REWARD_MODEL_KIND})")
    if trained_on is not None and trained_on != base_model:
        return (f"'{artifact_id}' was trained on base model '{trained_on}' and this job trains "
                f"'{base_model}'; give a reward model trained on the same base model")
    return None


def root_base_model(
    base_model: str, find_artifact: Callable[[str], object | None], base_model_of: Callable[[object], str | None]
) -> str:
    """The weights under a chain of ``artifact:<id>`` base models. An adapter stands on the base model its
    job trained (``base_model_of(artifact)``), so the chain goes on through adapters; full weights are
    themselves the base model a job on them loads, so the chain ends at them, as it does at an artifact
    ``find_artifact`` cannot find or whose base is unknown (None). A job continued from another job's
    adapter and a reward model that job trained thus compare equal, and a reward model trained on the
    weights under full weights does not pass for one trained on the full weights."""
    seen: set[str] = set()
    while base_model.startswith(ARTIFACT_REF_PREFIX) and base_model not in seen:
        seen.add(base_model)
        artifact = find_artifact(base_model.removeprefix(ARTIFACT_REF_PREFIX))
        parent = base_model_of(artifact) if artifact is not None and artifact.kind == "adapter" else None
        if parent is None:
            break
        base_model = parent
    return base_model


def start_artifact_problem(artifact_id: str, kind: str, adapter_type: str) -> str | None:
    """Why the artifact ``artifact_id``, of ``kind``, cannot be the ``base_model`` of a job whose adapter is
    ``adapter_type``; None when it can."""
    if kind not in POLICY_KINDS:
        return (f"'{artifact_id}' is an artifact of kind '{kind}', not a policy; give artifact:<id> of an artifact "
                f"an sft, dpo, orpo, simpo, kto, ppo, grpo or rloo stage published (kind {' or '.join(POLICY_KINDS)})")
    if kind == "adapter" and adapter_type in WHOLE_MODEL_ADAPTERS:
        return (f"'{artifact_id}' is an adapter and this job sets adapter.type '{adapter_type}'; set adapter.type "
                "to 'lora', 'dora' or 'ia3' to continue the adapter, or export the merged model (align export "
                "--merge) and give its folder as base_model")
    return None


def stage_inputs(
    job: JobSpec,
    index: int,
    published: Mapping[int, InputArtifact],
    find_artifact: Callable[[str], InputArtifact | None],
) -> StageInputs:
    """The inputs of stage ``index`` of ``job``.

    ``published`` maps the index of each earlier stage that succeeded to the artifact it published;
    ``find_artifact`` looks up the id of a ``reward_model: artifact:<id>`` or a ``base_model:
    artifact:<id>`` (None: no such artifact).
    Raises :class:`MissingInput` on ``stages[index].reward_model`` when the reward model is needed and
    cannot be found, is not a reward model, or was trained on another base model, and on ``base_model``
    when the artifact it names cannot be found or is not a policy this job can continue.
    """
    policy = _latest(job, index, published, POLICY_STAGE_TYPES)
    start_policy = policy.uri if policy else None
    if policy is None and job.base_model.startswith(ARTIFACT_REF_PREFIX):
        policy = _start_artifact(job, find_artifact)
        # Full weights are the job's base model itself (align.models.load.resolve_base_model), not an adapter.
        start_policy = policy.uri if policy.kind == "adapter" else None
    parents = [policy.artifact_id] if policy else []
    stage = job.stages[index]
    reward_model = None
    if scores_with_reward_model(stage):
        field = f"stages[{index}].reward_model"
        if stage.reward_model is not None:
            artifact_id = stage.reward_model.removeprefix(ARTIFACT_REF_PREFIX)
            reward_model = find_artifact(artifact_id)
            if reward_model is None:
                raise MissingInput(field, f"no artifact '{stage.reward_model}' among the artifacts this job may use")
            problem = reward_model_problem(artifact_id, reward_model.kind,
                                           _root(reward_model.base_model, find_artifact),
                                           _root(job.base_model, find_artifact))
            if problem is not None:
                raise MissingInput(field, problem)
        else:
            reward_model = _latest(job, index, published, ("rm",))
            if reward_model is None:
                raise MissingInput(field, "no rm stage before this one has published a reward model")
        parents.append(reward_model.artifact_id)
    return StageInputs(start_policy, parents, reward_model.uri if reward_model else None)


def scores_with_reward_model(stage) -> bool:
    """Whether the stage scores with a reward model: an online stage's ``reward``, or the ``eval_reward`` its
    held-out replies are scored with."""
    return MODEL_REWARD in (getattr(stage, "reward", None), getattr(stage, "eval_reward", None))


def start_artifact_check(job: JobSpec, find_artifact: Callable[[str], object | None]) -> str | None:
    """Why the artifact ``base_model: artifact:<id>`` names cannot start ``job``; None when it can, or when
    the base model is no artifact. ``find_artifact`` returns an object with the artifact's ``kind``, or None
    when the caller has no such artifact (another tenant's is missing too)."""
    if not job.base_model.startswith(ARTIFACT_REF_PREFIX):
        return None
    artifact_id = job.base_model.removeprefix(ARTIFACT_REF_PREFIX)
    artifact = find_artifact(artifact_id)
    if artifact is None:
        return (f"no artifact '{artifact_id}'; give artifact:<id> of a policy that a stage of one of your jobs "
                "published")
    return start_artifact_problem(artifact_id, artifact.kind, job.adapter.type)


def _root(base_model: str | None, find_artifact: Callable[[str], InputArtifact | None]) -> str | None:
    """:func:`root_base_model` over the artifacts ``find_artifact`` finds; None stays None (unknown)."""
    if base_model is None:
        return None
    return root_base_model(base_model, find_artifact, lambda artifact: artifact.base_model)


def _start_artifact(job: JobSpec, find_artifact: Callable[[str], InputArtifact | None]) -> InputArtifact:
    """The artifact ``base_model: artifact:<id>`` names, checked to be a policy the job can continue."""
    problem = start_artifact_check(job, find_artifact)
    if problem is not None:
        raise MissingInput("base_model", problem)
    return find_artifact(job.base_model.removeprefix(ARTIFACT_REF_PREFIX))


def _latest(job: JobSpec, index: int, published: Mapping[int, InputArtifact],
            stage_types: tuple[str, ...]) -> InputArtifact | None:
    """The artifact of the latest stage before ``index`` of one of ``stage_types`` that published one."""
    for earlier in range(index - 1, -1, -1):
        if job.stages[earlier].type in stage_types and earlier in published:
            return published[earlier]
    return None
