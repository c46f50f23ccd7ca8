"""What a stage starts from (align.lineage.stage_inputs), worked out by hand on small chains."""

from __future__ import annotations

import pytest

from align.lineage import InputArtifact, MissingInput, StageInputs, reward_model_problem, stage_inputs
from align.spec import parse_spec

PROMPTS = {"path": "builtin:parity/prompts"}
PREFS = {"path": "builtin:parity/prefs"}
SFT = InputArtifact("c.sft-v1-000000000001", "/store/c.sft/v1", "adapter", "builtin:tiny")
RM = InputArtifact("c.rm-v1-000000000002", "/store/c.rm/v1", "reward_model", "builtin:tiny")
DPO = InputArtifact("c.dpo-v1-000000000003", "/store/c.dpo/v1", "adapter", "builtin:tiny")


def job(*stages: dict, base_model: str = "builtin:tiny"):
    return parse_spec({"name": "c", "base_model": base_model, "stages": list(stages)})


def nothing_named(artifact_id: str) -> InputArtifact | None:
    raise AssertionError(f"no stage here names a reward model, yet {artifact_id!r} was looked up")


CHAIN = job(
    {"type": "sft", "data": {"path": "builtin:parity/sft"}},
    {"type": "rm", "data": PREFS},
    {"type": "dpo", "data": PREFS},
    {"type": "ppo", "data": PROMPTS},
    {"type": "grpo", "data": PROMPTS, "reward": "exact_answer"},
)


def test_each_stage_of_a_chain_starts_from_the_latest_policy_before_it():
    """sft -> rm -> dpo -> ppo -> grpo, every earlier stage published:
    sft has nothing before it; rm and dpo continue sft (rm is no policy); ppo continues dpo, the latest
    policy, and scores with rm; grpo (exact_answer) continues dpo and needs no reward model."""
    published = {0: SFT, 1: RM, 2: DPO}
    expected = {
        0: (None, [], None),
        1: (SFT.uri, [SFT.artifact_id], None),
        2: (SFT.uri, [SFT.artifact_id], None),
        3: (DPO.uri, [DPO.artifact_id, RM.artifact_id], RM.uri),
        4: (DPO.uri, [DPO.artifact_id], None),
    }
    for index, inputs in expected.items():
        earlier = {i: artifact for i, artifact in published.items() if i < index}
        assert stage_inputs(CHAIN, index, earlier, nothing_named) == StageInputs(*inputs), index


def test_a_stage_that_published_nothing_is_skipped():
    """With dpo (index 2) missing from what was published, ppo continues sft, the latest policy that did."""
    assert stage_inputs(CHAIN, 3, {0: SFT, 1: RM}, nothing_named) == (
        SFT.uri, [SFT.artifact_id, RM.artifact_id], RM.uri)


def test_an_online_stage_without_a_published_reward_model_is_refused():
    with pytest.raises(MissingInput) as missing:
        stage_inputs(CHAIN, 3, {0: SFT, 2: DPO}, nothing_named)
    assert missing.value.field == "stages[3].reward_model"
    assert missing.value.message == "no rm stage before this one has published a reward model"


def test_a_named_reward_model_is_looked_up_by_its_id_and_wins_over_the_jobs_own():
    other_rm = InputArtifact("o.rm-v2-00000000000a", "/store/o.rm/v2", "reward_model", "builtin:tiny")
    named = job(
        {"type": "sft", "data": {"path": "builtin:parity/sft"}},
        {"type": "rm", "data": PREFS},
        {"type": "ppo", "data": PROMPTS, "reward_model": f"artifact:{other_rm.artifact_id}"},
    )
    looked_up = []

    def find(artifact_id: str) -> InputArtifact | None:
        looked_up.append(artifact_id)
        return {other_rm.artifact_id: other_rm}.get(artifact_id)

    assert stage_inputs(named, 2, {0: SFT, 1: RM}, find) == (
        SFT.uri, [SFT.artifact_id, other_rm.artifact_id], other_rm.uri)
    assert looked_up == [other_rm.artifact_id]
    # As a job's first stage it has no policy: the reward model is its only parent.
    alone = job({"type": "ppo", "data": PROMPTS, "reward_model": f"artifact:{other_rm.artifact_id}"})
    assert stage_inputs(alone, 0, {}, find) == (None, [other_rm.artifact_id], other_rm.uri)


@pytest.mark.parametrize(
    ("found", "message"),
    [
        (None, "no artifact 'artifact:n.rm-v1-00000000000b' among the artifacts this job may use"),
        (InputArtifact("n.rm-v1-00000000000b", "/s/n", "adapter", "builtin:tiny"),
         "'n.rm-v1-00000000000b' is an artifact of kind 'adapter', not a reward model; give artifact:<id> of an "
         "artifact an rm stage published (kind reward_model)"),
        (InputArtifact("n.rm-v1-00000000000b", "/s/n", "reward_model", "/models/other"),
         "'n.rm-v1-00000000000b' was trained on base model '/models/other' and this job trains 'builtin:tiny'; "
         "give a reward model trained on the same base model"),
    ],
)
def test_a_named_reward_model_that_is_missing_or_unfit_is_refused(found, message):
    named = job({"type": "ppo", "data": PROMPTS, "reward_model": "artifact:n.rm-v1-00000000000b"})
    with pytest.raises(MissingInput) as missing:
        stage_inputs(named, 0, {}, lambda artifact_id: found)
    assert (missing.value.field, missing.value.message) == ("stages[0].reward_model", message)
    assert str(missing.value) == f"stages[0].reward_model: {message}"


def test_an_unknown_base_model_is_not_checked():
    assert reward_model_problem("n.rm-v1-00000000000b", "reward_model", None, "builtin:tiny") is None
    assert reward_model_problem("n.rm-v1-00000000000b", "reward_model", "builtin:tiny", "builtin:tiny") is None
