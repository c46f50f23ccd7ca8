"""What a stage starts from: the policy it continues, the reward model it scores with, and its parents.

One rule for the local runner and the service alike:

- the start policy is the artifact of the latest policy stage (sft, dpo, ppo, grpo, rloo) before the
  stage that published one; none for a job's first policy stage;
- an online stage with ``reward: model`` scores with the artifact its ``reward_model: artifact:<id>``
  names, else with the artifact of the latest rm stage before it; that artifact must be a reward
  model trained on the job's base model;
- the parents recorded in the stage's manifest are the start policy's id, then the reward model's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from align.artifact_manifest import ARTIFACT_REF_PREFIX, REWARD_MODEL_KIND
from align.spec import MODEL_REWARD, POLICY_STAGE_TYPES, JobSpec


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
    """URI of the reward model an online stage with ``reward: model`` scores with."""


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


def stage_inputs(
    job: JobSpec,
    index: int,
    published: Mapping[int, InputArtifact],
    find_artifact: Callable[[str], InputArtifact | None],
) -> StageInputs:
    """The inputs of stage ``index`` of ``job``.

    ``published`` maps the index of each earlier stage that succeeded to the artifact it published;
    ``find_artifact`` looks up the id of a ``reward_model: artifact:<id>`` (None: no such artifact).
    Raises :class:`MissingInput` on ``stages[index].reward_model`` when the reward model is needed and
    cannot be found, is not a reward model, or was trained on another base model.
    """
    policy = _latest(job, index, published, POLICY_STAGE_TYPES)
    parents = [policy.artifact_id] if policy else []
    stage = job.stages[index]
    reward_model = None
    if getattr(stage, "reward", None) == MODEL_REWARD:
        field = f"stages[{index}].reward_model"
        if stage.reward_model is not None:
            artifact_id = stage.reward_model.removeprefix(ARTIFACT_REF_PREFIX)
            reward_model = find_artifact(artifact_id)
            if reward_model is None:
                raise MissingInput(field, f"no artifact '{stage.reward_model}' among the artifacts this job may use")
            problem = reward_model_problem(artifact_id, reward_model.kind, reward_model.base_model, job.base_model)
            if problem is not None:
                raise MissingInput(field, problem)
        else:
            reward_model = _latest(job, index, published, ("rm",))
            if reward_model is None:
                raise MissingInput(field, "no rm stage before this one has published a reward model")
        parents.append(reward_model.artifact_id)
    return StageInputs(policy.uri if policy else None, parents, reward_model.uri if reward_model else None)


def _latest(job: JobSpec, index: int, published: Mapping[int, InputArtifact],
            stage_types: tuple[str, ...]) -> InputArtifact | None:
    """The artifact of the latest stage before ``index`` of one of ``stage_types`` that published one."""
    for earlier in range(index - 1, -1, -1):
        if job.stages[earlier].type in stage_types and earlier in published:
            return published[earlier]
    return None
