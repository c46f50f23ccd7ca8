"""The dispatcher: claims queued stage runs, submits one Ray job per attempt and follows it to the end.

One :meth:`Dispatcher.tick` is one pass over the database and Ray's view of it:
1. stop the Ray jobs of stage runs cancelled while running;
2. reconcile running stage runs with Ray: success needs an artifact reported by that attempt (once recorded
   it stands, whatever Ray then says: a worker killed while it shuts down leaves a complete artifact) whose
   evaluation gate, if the stage sets one, passed (else the stage fails with ``failed_gate``); a failure
   is decided by the attempt's "failed" report (none: the worker was lost, retryable); an expired lease
   is rescued (Ray job stopped, its end confirmed, the stage requeued or failed); an attempt Ray ran and
   then forgot (its head restarted) fails with ``ray_lost`` (retryable). The workers' heartbeats renew
   the lease for the whole attempt; the dispatcher renews it while Ray prepares the job and while Ray
   refuses submissions (a cluster fault that uses up no attempt);
3. claim queued stage runs (the ones step 2 just queued too) and submit each with its
   :class:`~align.stage_launch.StageLaunch` (``align-<stage_run_id>-a<attempt>``, looked up in Ray
   first); one whose reward model cannot be found, or whose stored spec no longer validates, fails for
   good instead.
Several dispatchers may run against one database: every change is a guarded, attempt-fenced update.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from align.lineage import MissingInput
from align.spec import SpecError, parse_spec
from align.stage_launch import ReportEndpoint, StageLaunch
from services.db import artifacts, events, leases, quotas, reports, transitions
from services.db.models import FAILED_GATE, RUNNING, Job, StageRun, utcnow
from services.db.session import database_unavailable, error_line
from services.local_ray import CLUSTER_ENV_VAR
from services.metrics import DispatcherMetrics
from services.settings import Settings

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSED_ENV_VARS = ("ALIGN_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM",
                   "OMP_NUM_THREADS")
ACTIVE, ENDED = ("PENDING", "RUNNING"), ("SUCCEEDED", "FAILED", "STOPPED")
START_GRACE_SECONDS = 120.0
"""How long after its claim an attempt Ray runs keeps its lease without a report of its own: its entrypoint's
first heartbeat follows its imports. From then on the workers' heartbeats renew it."""


class RayJobsLike(Protocol):
    def submit_job(self, *, entrypoint: str, submission_id: str, runtime_env: dict,
                   entrypoint_num_cpus: float = 0) -> str: ...
    def get_job_status(self, submission_id: str) -> str | None: ...
    def stop_job(self, submission_id: str) -> bool: ...
    def get_job_info(self, submission_id: str) -> dict | None: ...
    def get_job_logs(self, submission_id: str) -> str: ...


def _is_missing(error: RuntimeError) -> bool:
    return "status code 404" in str(error) or "does not exist" in str(error)


class RayJobs:
    """The Ray Jobs API as the dispatcher uses it; an unknown submission id reads as None, not an error.

    ``cluster_address`` is the GCS address of the cluster when this service knows it (its own local
    Ray): the dispatcher pins it in every job's runtime env. ``local`` is that local Ray, stopped by
    :meth:`close`.
    """

    def __init__(self, address: str, cluster_address: str | None = None, local: Any = None):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.cluster_address = cluster_address
        self.local = local
        self._client = JobSubmissionClient(address)
        self._probes: set[str] = set()
        self._probes_lock = threading.Lock()  # /readyz requests probe from several threads at once

    @classmethod
    def connect(cls, ray_address: str | None) -> RayJobs:
        """Connect to ``ray_address``, or start a local Ray of this service's own (see :func:`start_local`)."""
        return cls(ray_address) if ray_address else cls.start_local()

    @classmethod
    def start_local(cls, num_cpus: int | None = None) -> RayJobs:
        """Start a Ray head of this service's own (:mod:`services.local_ray`) and talk to its Jobs API.

        Raises :class:`services.local_ray.LocalRayError` with a one-line message when it does not start.
        """
        from align.paths import home_dir
        from services import local_ray

        ray = local_ray.start(home_dir(), num_cpus=num_cpus)
        try:
            return cls(ray.dashboard_url, cluster_address=ray.gcs_address, local=ray)
        except Exception:
            ray.stop()
            raise

    def close(self) -> None:
        """Stop the local Ray this client started, if it did."""
        if self.local is not None:
            self.local.stop()

    def check_submission(self) -> None:
        """Submit a job that does nothing; raises when the Jobs API does not accept it.

        Answering a status query only needs the dashboard; a submission also needs the head node's
        job agent and raylet, which is what the dispatcher needs. Earlier probes that ended are deleted; one
        that Ray took and then failed (its job could not start) raises too, once this probe is submitted.
        """
        with self._probes_lock:
            earlier = sorted(self._probes)
        failed = None
        for submission_id in earlier:
            try:
                status = self.get_job_status(submission_id)
                if status == "FAILED" and failed is None:
                    info = self.get_job_info(submission_id) or {}
                    failed = f"Ray took readiness probe {submission_id} but it failed: {info.get('message')}"
                if status in ENDED:
                    self._client.delete_job(submission_id)
                if status in ENDED or status is None:
                    with self._probes_lock:
                        self._probes.discard(submission_id)
            except (OSError, RuntimeError):  # unreachable, or another probe deleted it a moment ago
                break
        submission_id = f"align-readiness-{uuid.uuid4().hex[:12]}"
        self._client.submit_job(entrypoint="true", submission_id=submission_id, entrypoint_num_cpus=0,
                                metadata={"align": "readiness probe"})
        with self._probes_lock:
            self._probes.add(submission_id)
        if failed is not None:
            raise RuntimeError(failed)

    def submit_job(self, *, entrypoint: str, submission_id: str, runtime_env: dict,
                   entrypoint_num_cpus: float = 0) -> str:
        return self._client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                       runtime_env=runtime_env, entrypoint_num_cpus=entrypoint_num_cpus)

    def get_job_status(self, submission_id: str) -> str | None:
        try:
            return str(self._client.get_job_status(submission_id).value)
        except RuntimeError as error:
            if _is_missing(error):
                return None
            raise

    def stop_job(self, submission_id: str) -> bool:
        try:
            return self._client.stop_job(submission_id)
        except RuntimeError as error:
            if _is_missing(error):
                return False
            raise

    def get_job_info(self, submission_id: str) -> dict | None:
        try:
            info = self._client.get_job_info(submission_id)
        except RuntimeError as error:
            if _is_missing(error):
                return None
            raise
        return {"status": str(info.status.value), "message": info.message, "error_type": info.error_type,
                "start_time": info.start_time, "end_time": info.end_time}

    def get_job_logs(self, submission_id: str) -> str:
        return self._client.get_job_logs(submission_id)


def _failure(run: StageRun, status: str | None) -> tuple[str, str, str | None, bool]:
    """Why an attempt without a usable result failed: its own "failed" report, else what Ray saw."""
    if status == "SUCCEEDED":
        return "no_artifact", "the worker exited without reporting an artifact", None, True
    if run.error_code is not None:
        return run.error_code, run.error_message or "", run.error_field, bool(run.retryable)
    if status is None:
        return "lease_expired", "Ray has no job for this attempt and its lease expired", None, True
    message = f"Ray job {status} without a failure report (worker lost, killed or out of memory)"
    return "worker_lost", message, None, True


def one_line(error: Exception) -> str:
    """An error in one line (Ray answers a failed submission with a whole traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(error).__name__}: {detail}"[:300]


def default_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Dispatcher:
    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], ray_client: RayJobsLike,
                 owner_id: str | None = None, entrypoint: str | None = None, max_claims_per_tick: int = 32,
                 metrics: DispatcherMetrics | None = None):
        self.settings = settings
        self.session_factory = session_factory
        self.ray = ray_client
        self.owner_id = owner_id or default_owner_id()
        # A local Ray runs the entrypoint with its own PATH: name this interpreter so the venv is used.
        python = settings.worker_python or ("python" if settings.ray_address else sys.executable)
        self.entrypoint = entrypoint or f"{shlex.quote(python)} -m workers.entrypoint"
        self.max_claims_per_tick = max_claims_per_tick
        self.metrics = metrics or DispatcherMetrics(CollectorRegistry())
        self._seen: set[str] = set()
        """Submission ids this dispatcher saw Ray report on: one Ray then answers None for, it lost."""
        self._refused: dict[str, int] = {}
        """Submissions Ray did not take, and how many times in a row."""
        self.draining = False
        """Set by :meth:`drain` (or a signal handler): no further claims."""

    def tick(self) -> None:
        """One pass: stop cancelled, reconcile running stage runs with Ray, claim and submit."""
        self.stop_cancelled()
        self.reconcile()
        self.claim_and_submit()

    def run_forever(self, stop_event: threading.Event) -> None:
        """Tick every ``dispatcher_poll_seconds`` until ``stop_event`` is set; a failed tick is logged.

        While the database cannot be reached the pause doubles, up to ``dispatcher_max_backoff_seconds``, and
        the outage is logged in one line when it starts and one when a tick works again."""
        poll, most = self.settings.dispatcher_poll_seconds, self.settings.dispatcher_max_backoff_seconds
        pause, outage_since = poll, None
        while not stop_event.is_set():
            try:
                self.tick()
            except Exception as error:
                if not database_unavailable(error):
                    log.exception("dispatcher tick failed; next in %.1f s", poll)
                    pause = poll
                else:
                    if outage_since is None:
                        outage_since = time.monotonic()
                        log.warning("dispatcher: the database is unavailable (%s); backing off, up to %g s between "
                                    "tries", error_line(error), most)
                    pause = min(pause * 2, max(most, poll))
            else:
                if outage_since is not None:
                    log.warning("dispatcher: the database is back after %.1f s; polling every %g s again",
                                time.monotonic() - outage_since, poll)
                pause, outage_since = poll, None
            stop_event.wait(pause)

    def stop_cancelled(self) -> None:
        with self.session_factory() as s:
            runs = [(r.id, r.attempt, r.submission_id) for r in leases.cancelled_with_live_submission(s)]
        for run_id, attempt, submission_id in runs:
            if self.ray.get_job_status(submission_id) in ACTIVE:
                self.ray.stop_job(submission_id)
            if self.ray.get_job_status(submission_id) not in ACTIVE:
                with self.session_factory.begin() as s:
                    leases.release_cancelled(s, run_id, attempt)

    def claim_and_submit(self) -> None:
        """Claim and submit queued stage runs; no more this pass once Ray refuses a submission."""
        for _ in range(self.max_claims_per_tick):
            if self.draining:
                return
            with self.session_factory.begin() as s:
                run = transitions.claim_next(s, self.owner_id, self.settings.lease_seconds, quotas.admission)
                if run is None:
                    return
                launch = self.launch_or_fail(s, run)
            if launch is not None and not self.submit(launch):
                return

    def drain(self) -> int:
        """Stop claiming and leave this dispatcher's running attempts to the others; returns their count.

        Each attempt it claimed but has not submitted yet is submitted now (no other dispatcher would
        before its lease ran out). Its running attempts keep their leases and go on training: their
        workers' reports renew the leases, and every dispatcher follows every running attempt, so another
        one records how each ends; none is stopped, requeued or counted as a failure.
        """
        self.draining = True
        with self.session_factory() as s:
            mine = [(r.id, r.attempt) for r in leases.running_stage_runs(s) if r.lease_owner == self.owner_id]
        for run_id, attempt in mine:
            try:
                self.reconcile_one(run_id, attempt)
            except Exception:
                log.exception("could not hand over stage run %s attempt %d", run_id, attempt)
        log.info("dispatcher %s drained: %d running attempts left to the other dispatchers", self.owner_id, len(mine))
        return len(mine)

    def launch(self, s: Session, run: StageRun) -> StageLaunch:
        """The claimed attempt's launch, the ticket the worker reads from ``ALIGN_TICKET``."""
        spec = parse_spec(s.get(Job, run.job_id).spec)
        inputs = artifacts.stage_inputs(s, run, spec)
        return StageLaunch(
            spec=spec,
            index=run.index,
            work_dir=f"{self.settings.work_root.rstrip('/')}/{run.job_id}/{run.id}",
            artifact_root=self.settings.artifact_root,
            start_policy=inputs.start_policy,
            reward_model=inputs.reward_model,
            parents=inputs.parents,
            require_checkpoint=run.checkpoint_uri is not None,
            attempt=run.attempt,
            job_id=run.job_id,
            stage_run_id=run.id,
            report=ReportEndpoint(url=f"{self.settings.public_url.rstrip('/')}/internal/reports",
                                  token=self.settings.report_token(run.id, run.attempt),
                                  heartbeat_seconds=min(5.0, self.settings.lease_seconds / 3),
                                  schedule_timeout_seconds=self.settings.schedule_timeout_seconds),
            mlflow_tracking_uri=self.settings.mlflow_tracking_uri if "mlflow" in spec.report_to else None,
        )

    def launch_or_fail(self, s: Session, run: StageRun) -> StageLaunch | None:
        """The launch, or None after failing the attempt for good: an input artifact is missing or unfit
        (``missing_input``), or the stored spec no longer validates (``bad_spec``)."""
        try:
            return self.launch(s, run)
        except MissingInput as missing:
            code, message, field = "missing_input", missing.message, missing.field
        except SpecError as error:
            code, message, field = "bad_spec", str(error), error.errors[0][0] if error.errors else None
        if transitions.fail_attempt(s, run.id, run.attempt, code, message, field, retryable=False):
            self.metrics.failed_attempts.labels(code, "failed").inc()
        log.warning("stage run %s attempt %d not submitted: %s: %s", run.id, run.attempt, code, message)
        return None

    def runtime_env(self, launch: StageLaunch) -> dict[str, Any]:
        env = {name: os.environ[name] for name in PASSED_ENV_VARS if name in os.environ}
        env["ALIGN_TICKET"] = launch.model_dump_json()
        cluster = getattr(self.ray, "cluster_address", None)
        if cluster:
            # RAY_ADDRESS reaches every actor of the job (Ray Train's own look-ups fail with "multiple
            # active Ray instances" without it); the job supervisor gives the entrypoint its own "auto"
            # look-up instead, so the entrypoint joins ALIGN_RAY_CLUSTER explicitly.
            env["RAY_ADDRESS"] = env[CLUSTER_ENV_VAR] = cluster
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        return {"env_vars": env}

    def submit(self, launch: StageLaunch) -> bool:
        """Submit one attempt unless Ray already has its submission id (a restarted dispatcher).

        False when Ray cannot take it now (unreachable, or "No available agent"): a fault of the cluster,
        not of the stage, so the attempt keeps its lease and is submitted again on the next pass.
        """
        submission_id = transitions.submission_id_for(launch.stage_run_id, launch.attempt)
        try:
            if self.ray.get_job_status(submission_id) is None:
                self.ray.submit_job(entrypoint=self.entrypoint, submission_id=submission_id,
                                    runtime_env=self.runtime_env(launch), entrypoint_num_cpus=0)
                log.info("submitted %s", submission_id)
        except (OSError, RuntimeError) as error:  # connection errors, or the Jobs API's own RuntimeError
            self.submission_refused(launch, submission_id, error)
            return False
        refused = self._refused.pop(submission_id, 0)
        if refused:
            self.note(launch, "info", f"Ray accepted {submission_id} after {refused} refused submissions")
        return True

    def submission_refused(self, launch: StageLaunch, submission_id: str, error: Exception) -> None:
        """Keep the lease of an attempt Ray did not take, and say so once in the job's events."""
        first = submission_id not in self._refused
        self._refused[submission_id] = self._refused.get(submission_id, 0) + 1
        reason = one_line(error)
        log.warning("Ray did not take %s (try %d): %s", submission_id, self._refused[submission_id], reason)
        with self.session_factory.begin() as s:
            leases.renew_lease(s, launch.stage_run_id, launch.attempt, self.settings.lease_seconds)
        if first:
            self.note(launch, "warning", f"Ray cannot take the stage's job now ({reason}); the dispatcher "
                      f"submits it again every {self.settings.dispatcher_poll_seconds:g} s without using up an "
                      "attempt (check the cluster: /readyz)")

    def note(self, launch: StageLaunch, level: str, text: str) -> None:
        with self.session_factory.begin() as s:
            events.record_event(s, launch.job_id, "message", {"level": level, "text": text}, launch.stage_run_id,
                                launch.attempt, level)

    def reconcile(self) -> None:
        with self.session_factory() as s:
            runs = leases.running_stage_runs(s)
            running = [(r.id, r.attempt) for r in runs]
            live = {r.submission_id for r in runs}
        self._seen &= live  # what it remembers of attempts that ended is of no more use
        self._refused = {key: count for key, count in self._refused.items() if key in live}
        for run_id, attempt in running:
            try:
                self.reconcile_one(run_id, attempt)
            except Exception:
                log.exception("could not reconcile stage run %s attempt %d", run_id, attempt)

    def reconcile_one(self, run_id: str, attempt: int) -> None:
        with self.session_factory() as s:
            run = s.get(StageRun, run_id)
            if run is None or run.state != RUNNING or run.attempt != attempt:
                return
            submission_id, owner, reported = run.submission_id, run.lease_owner, run.phase is not None
            starting = run.started_at is not None and (utcnow() - run.started_at).total_seconds() < START_GRACE_SECONDS
            rescued = run.error_code == "lease_expired"
            expired = run.lease_expires_at is not None and run.lease_expires_at < utcnow()
        status = self.ray.get_job_status(submission_id)
        if status is not None:
            self._seen.add(submission_id)
        if status is None and owner == self.owner_id and (reported or submission_id in self._seen):
            # Ray ran this attempt and has forgotten it: its head restarted (or the job was deleted).
            self.finish(run_id, attempt, None, lost=True)
            return
        if status is None and owner == self.owner_id and not expired:
            # Claimed but never submitted (a crash or a Ray error in between): submit it now.
            with self.session_factory.begin() as s:
                launch = self.launch_or_fail(s, s.get(StageRun, run_id))
            if launch is not None:
                self.submit(launch)
            return
        if status in ACTIVE and expired:
            self.rescue(run_id, attempt, submission_id, record=not rescued)
            status = self.ray.get_job_status(submission_id)
        elif status == "PENDING" or (status == "RUNNING" and not reported and starting):
            # Ray is still preparing the job, or its entrypoint is starting up (imports on a busy node take
            # seconds): nothing can report yet, so the dispatcher keeps the lease.
            with self.session_factory.begin() as s:
                if leases.renew_lease(s, run_id, attempt, self.settings.lease_seconds):
                    self.metrics.lease_renewals.inc()
        if status in ENDED or (status is None and expired):
            self.finish(run_id, attempt, status)

    def rescue(self, run_id: str, attempt: int, submission_id: str, record: bool = True) -> None:
        """An expired lease: record why, then stop the Ray job (its end is confirmed before requeueing)."""
        if record:
            message = f"no report for {self.settings.lease_seconds:g} s; stopped Ray job {submission_id}"
            failure = {"code": "lease_expired", "message": message, "field": None, "retryable": True}
            with self.session_factory.begin() as s:
                # Locked, so that of two dispatchers that both saw the lease expire only the first records it.
                run = s.get(StageRun, run_id, with_for_update=True, populate_existing=True)
                recorded = run is not None and run.error_code != "lease_expired" and reports.apply_report(
                    s, run_id, attempt, "failed", failure, lease_seconds=self.settings.lease_seconds)
            if recorded:  # not when the attempt ended, or another dispatcher rescued it, meanwhile
                self.metrics.rescues.inc()
        self.ray.stop_job(submission_id)
        log.warning("stage run %s attempt %d: lease expired, stopping %s", run_id, attempt, submission_id)

    def finish(self, run_id: str, attempt: int, status: str | None, lost: bool = False) -> None:
        """Decide an attempt whose Ray job has ended, that Ray never had, or that Ray lost (``lost``)."""
        with self.session_factory.begin() as s:
            run = s.get(StageRun, run_id)
            if run is None or run.state != RUNNING or run.attempt != attempt:
                return
            artifact = artifacts.artifact_for(s, run_id, attempt)
            if artifact is not None:
                # Published and recorded: a Ray job that then failed (its worker killed while it shut down)
                # or was lost costs no retry, which would only publish the same result again.
                if status != "SUCCEEDED":
                    log.warning("stage run %s attempt %d: Ray %s after its artifact was recorded; the artifact stands",
                                run_id, attempt, "lost the job" if lost else f"job {status}")
                if artifact.gate is not None and not artifact.gate["passed"]:
                    # The gate decides the stage, not a retry: the artifact is kept, the later stages cancelled.
                    message = f"gate failed: {artifact.gate['reason']}; artifact {artifact.id} is kept"
                    transitions.fail(s, run_id, attempt, FAILED_GATE, message, f"stages[{run.index}].gate")
                    self.metrics.failed_attempts.labels(FAILED_GATE, "failed").inc()
                else:
                    transitions.succeed(s, run_id, attempt)
                return
            code, message, field, retryable = _failure(run, status)
            if lost and run.retryable is not False:  # a failure for good that the worker reported stands
                said = f"{run.error_code}: {(run.error_message or '')[:300]}"
                reported = f" (the worker reported {said})" if run.error_code else ""
                code, field, retryable = "ray_lost", None, True
                message = (f"Ray has no job {run.submission_id} any more, though it ran: its head restarted or "
                           f"the job was deleted; the stage is retried from its last checkpoint{reported}")
            outcome = transitions.fail_attempt(s, run_id, attempt, code, message, field, retryable)
        if outcome is not None:
            self.metrics.failed_attempts.labels(code, outcome).inc()
        log.info("stage run %s attempt %d: Ray %s -> %s", run_id, attempt, status, outcome)
