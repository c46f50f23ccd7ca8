"""Random interleavings of what dispatchers, workers and users do to a job's stages, on Postgres: claims,
worker reports (current and fenced old attempts), lease expiry and rescue, renewals, the dispatcher's
decision when an attempt ends, retries and cancels. After every step the stage rows must keep the state
machine's invariants (services/db/transitions.py):

- terminal states are absorbing: a succeeded, failed or cancelled stage never changes state or attempt;
- at most one live attempt per stage, and per job at most one stage running or retrying (stages run in
  order); a running stage is leased, under the submission id of its current attempt;
- no stage starts after a cancelled or failed predecessor;
- attempt numbers only grow, and never past ``max_attempts``;
- a fenced report (an attempt number other than the current one) changes nothing and answers False.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select, update

from align.spec import parse_spec
from services.db import artifacts, auth, jobs, leases, reports, transitions
from services.db.models import (
    CANCELLED,
    FAILED,
    PENDING,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    StageRun,
    utcnow,
)

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)

STAGES = 3
MAX_ATTEMPTS = 3
LEASE_SECONDS = 300.0
REPORT_TYPES = ("heartbeat", "metrics", "checkpoint", "message", "artifact", "failed")
COLUMNS = ("state", "attempt", "lease_owner", "lease_expires_at", "progress_step", "checkpoint_uri",
           "checkpoint_step", "error_code", "error_message", "submission_id", "started_at", "finished_at")
focus = st.integers(0, 9)
"""Which stage a rule acts on: mostly the job's current one (the first not succeeded), else any."""
owners = st.sampled_from(["dispatcher-a", "dispatcher-b"])


def _payload(type: str, run_id: str, attempt: int, step: int) -> dict:
    return {
        "heartbeat": {"step": step, "total_steps": 10},
        "metrics": {"step": step, "loss": 1.0 / (step + 1)},
        "checkpoint": {"uri": f"file:///work/{run_id}/a{attempt}/step-{step}", "step": step},
        "message": {"level": "info", "text": "hello"},
        "artifact": {"artifact_id": f"art_{run_id}_{attempt}", "uri": f"file:///artifacts/{run_id}/v{attempt}",
                     "lineage": run_id, "version": attempt, "kind": "adapter", "manifest_hash": "0" * 64},
        "failed": {"code": "data_error", "message": "bad row", "retryable": step % 2 == 0},
    }[type]


class StageMachine(RuleBasedStateMachine):
    session_factory = None  # set by the test

    @initialize()
    def new_job(self):
        spec = parse_spec({"name": "machine", "base_model": "builtin:tiny", "stages": [
            {"type": "sft", "data": {"path": "/data/sft.jsonl"}},
            {"type": "dpo", "data": {"path": "/data/prefs.jsonl"}},
            {"type": "sft", "name": "polish", "data": {"path": "/data/sft.jsonl"}},
        ]})
        with self.session_factory.begin() as s:
            tenant = auth.create_tenant(s, f"machine-{utcnow().timestamp()}")
            job, _ = jobs.create_job(s, tenant.id, spec, None, spec.hash(), max_attempts=MAX_ATTEMPTS)
            self.tenant_id, self.job_id = tenant.id, job.id
            self.run_ids = [run.id for run in job.stage_runs]
        self.seen = self._rows()

    def teardown(self):
        # Nothing queued is left for the next example's claim_next.
        if getattr(self, "job_id", None):
            with self.session_factory.begin() as s:
                jobs.cancel_job(s, self.tenant_id, self.job_id)

    def _rows(self) -> list[dict]:
        with self.session_factory() as s:
            rows = s.scalars(select(StageRun).where(StageRun.job_id == self.job_id).order_by(StageRun.index))
            return [{column: getattr(row, column) for column in COLUMNS} | {"id": row.id} for row in rows]

    def _row(self, index: int) -> dict:
        return self._rows()[index]

    def _pick(self, focus: int) -> int:
        if focus >= 7:
            return focus % STAGES
        return next((i for i, row in enumerate(self.seen) if row["state"] != SUCCEEDED), STAGES - 1)

    def _any(self, *states: str) -> bool:
        return any(row["state"] in states for row in self.seen)

    # --- what dispatchers do ---------------------------------------------------------------------------

    @precondition(lambda self: self._any("queued"))
    @rule(owner=owners)
    def claim_next(self, owner):
        before = self._rows()
        with self.session_factory.begin() as s:
            run = transitions.claim_next(s, owner, LEASE_SECONDS)
            claimed = None if run is None else (run.id, run.attempt, run.lease_owner)
        queued = [row for row in before if row["state"] == "queued"]
        if not queued:
            assert claimed is None
            return
        assert claimed is not None and claimed[0] == queued[0]["id"]
        assert claimed[1] == queued[0]["attempt"] + 1 and claimed[2] == owner

    @rule(focus=focus, stale=st.booleans(), owner=owners)
    def claim_one(self, focus, stale, owner):
        """A second dispatcher's claim of a stage it read earlier: only one at the current attempt wins."""
        row = self._row(self._pick(focus))
        attempt = row["attempt"] - 1 if stale else row["attempt"]
        with self.session_factory.begin() as s:
            won = transitions.claim(s, row["id"], attempt, owner, LEASE_SECONDS)
        assert won == (row["state"] == "queued" and not stale)

    @precondition(lambda self: self._any(RUNNING))
    @rule(focus=focus)
    def expire_lease(self, focus):
        """The clock passes the lease: no report came for ``lease_seconds``."""
        with self.session_factory.begin() as s:
            s.execute(update(StageRun).where(StageRun.id == self.run_ids[self._pick(focus)], StageRun.state == RUNNING)
                      .values(lease_expires_at=utcnow() - timedelta(seconds=1)))

    @precondition(lambda self: self._any(RUNNING))
    @rule(focus=focus, stale=st.booleans())
    def renew(self, focus, stale):
        row = self._row(self._pick(focus))
        with self.session_factory.begin() as s:
            renewed = leases.renew_lease(s, row["id"], row["attempt"] - stale, LEASE_SECONDS)
        assert renewed == (row["state"] == RUNNING and not stale)

    @precondition(lambda self: self._any(RUNNING))
    @rule(focus=focus)
    def rescue(self, focus):
        """The dispatcher's rescue of an expired lease: record why, then end the attempt (retry or fail)."""
        with self.session_factory.begin() as s:
            run = s.get(StageRun, self.run_ids[self._pick(focus)], with_for_update=True, populate_existing=True)
            if run.state != RUNNING or run.lease_expires_at is None or run.lease_expires_at >= utcnow():
                return
            attempt = run.attempt
            failure = {"code": "lease_expired", "message": "no report", "retryable": True}
            assert reports.apply_report(s, run.id, attempt, "failed", failure, lease_seconds=LEASE_SECONDS)
            outcome = transitions.fail_attempt(s, run.id, attempt, "lease_expired", "no report")
        assert outcome == ("queued" if attempt < MAX_ATTEMPTS else FAILED)

    @precondition(lambda self: self._any(RUNNING))
    @rule(focus=focus, retryable=st.booleans())
    def attempt_ended(self, focus, retryable):
        """The dispatcher sees the attempt's Ray job end: with an artifact recorded it succeeded (however the
        Ray job ended), else a failed attempt."""
        row = self._row(self._pick(focus))
        with self.session_factory.begin() as s:
            if row["state"] != RUNNING:
                assert transitions.fail_attempt(s, row["id"], row["attempt"], "x", "y") is None
                return
            if artifacts.artifact_for(s, row["id"], row["attempt"]) is not None:
                assert transitions.succeed(s, row["id"], row["attempt"])
                return
            outcome = transitions.fail_attempt(s, row["id"], row["attempt"], "worker_lost", "ended", None, retryable)
        assert outcome == ("queued" if retryable and row["attempt"] < MAX_ATTEMPTS else FAILED)

    # --- what workers do -------------------------------------------------------------------------------

    @rule(focus=focus, type=st.sampled_from(REPORT_TYPES), attempt_offset=st.sampled_from([0, 0, -1, 1]),
          step=st.integers(0, 1000))
    def report(self, focus, type, attempt_offset, step):
        index = self._pick(focus)
        before = self._row(index)
        attempt = before["attempt"] + attempt_offset
        with self.session_factory.begin() as s:
            applied = reports.apply_report(s, before["id"], attempt, type, _payload(type, before["id"], attempt, step),
                                           lease_seconds=LEASE_SECONDS)
        after = self._row(index)
        if attempt_offset or before["state"] != RUNNING:
            assert not applied
            assert after == before, "a fenced or late report changed the stage"
        else:
            assert applied and after["state"] == RUNNING and after["attempt"] == before["attempt"]

    # --- what users do ---------------------------------------------------------------------------------

    @precondition(lambda self: not all(row["state"] in TERMINAL_STATES for row in self.seen))
    @rule(focus=focus, whole_job=st.booleans(), now=st.integers(0, 5))
    def cancel(self, focus, whole_job, now):
        """A user cancels the job, or one stage of it; only one draw in six, so that most jobs get further."""
        if now:
            return
        row = self._row(self._pick(focus))
        with self.session_factory.begin() as s:
            if whole_job:
                jobs.cancel_job(s, self.tenant_id, self.job_id)
            elif row["state"] not in TERMINAL_STATES:
                assert transitions.cancel(s, row["id"], row["state"], row["attempt"])
        if whole_job:
            assert all(row["state"] in TERMINAL_STATES for row in self._rows())

    @rule(focus=focus)
    def release_cancelled(self, focus):
        row = self._row(self._pick(focus))
        with self.session_factory.begin() as s:
            released = leases.release_cancelled(s, row["id"], row["attempt"])
        assert released == (row["state"] == CANCELLED)

    # --- invariants ------------------------------------------------------------------------------------

    @invariant()
    def stage_rows_keep_the_rules(self):
        rows = self._rows()
        live = [row for row in rows if row["state"] in (RUNNING, RETRYING)]
        assert len(live) <= 1, "two stages of one job are live at once"
        for index, (row, seen) in enumerate(zip(rows, self.seen)):
            if seen["state"] in TERMINAL_STATES:
                assert (row["state"], row["attempt"]) == (seen["state"], seen["attempt"]), (
                    f"stage {index} left a terminal state")
            assert seen["attempt"] <= row["attempt"] <= MAX_ATTEMPTS, f"stage {index} attempt went back or too far"
            if row["state"] == RUNNING:
                assert row["lease_owner"] is not None and row["lease_expires_at"] is not None
                assert row["submission_id"] == transitions.submission_id_for(row["id"], row["attempt"])
            earlier = [before["state"] for before in rows[:index]]
            if FAILED in earlier or CANCELLED in earlier:
                assert row["state"] == CANCELLED and row["attempt"] == 0 and row["started_at"] is None, (
                    f"stage {index} started after a failed or cancelled predecessor")
            if row["state"] not in (PENDING, CANCELLED) or row["attempt"]:
                assert all(state == SUCCEEDED for state in earlier), f"stage {index} started before its turn"
        self.seen = rows


def test_stage_state_machine_keeps_its_invariants(session_factory):
    machine = type("Machine", (StageMachine,), {"session_factory": session_factory})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=40, stateful_step_count=40, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
