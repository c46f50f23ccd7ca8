"""Heartbeats of a stage attempt for its whole life, from a thread of their own, with the attempt's phase.

The service renews an attempt's lease on each heartbeat, so the lease follows whether the attempt's
processes are alive, not whether training steps come: an attempt that starts its worker group, waits
for CPUs/GPUs, evaluates or publishes keeps its lease, and one whose process hangs or dies loses it.

The entrypoint's :class:`Liveness` says ``starting`` and, while Ray Train's worker group waits for its
placement group, ``waiting_for_resources`` (:class:`PlacementWatch`); past the schedule deadline the
attempt fails for good with ``unschedulable``. Rank 0's says ``training``, ``evaluating`` and
``publishing`` as the stage moves on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from align.stage_launch import StageLaunch
from workers.report import Fenced, Reporter

logger = logging.getLogger(__name__)
# A heartbeat every few seconds: httpx's line per request would fill the Ray job's log.
logging.getLogger("httpx").setLevel(logging.WARNING)

WATCH_SECONDS = 1.0
"""How often a watch (:class:`PlacementWatch`) looks at the cluster."""


class Liveness:
    """A daemon thread that sends a heartbeat every ``every`` seconds, and at once when the phase changes.

    A heartbeat carries the phase until the service took it once; ``None`` says nothing about the phase
    (another process of the attempt does). ``watch(self)``, if given, runs every :data:`WATCH_SECONDS`
    first. A 409 (the attempt was fenced off) ends the thread and is kept in :attr:`fenced`.
    """

    def __init__(self, launch: StageLaunch, phase: str | None, watch: Callable[[Liveness], None] | None = None):
        endpoint = launch.report
        assert endpoint is not None and launch.stage_run_id is not None
        self.every = endpoint.heartbeat_seconds
        self.reporter = Reporter(endpoint.url, endpoint.token, launch.stage_run_id, launch.attempt,
                                 timeout=max(1.0, min(5.0, self.every)), retries=0, deadline=0)
        self.watch = watch
        self.fenced: Fenced | None = None
        self._phase, self._detail, self._sent_phase = phase, None, None
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="align-liveness", daemon=True)

    @property
    def phase(self) -> str | None:
        return self._phase

    def set_phase(self, phase: str | None, detail: str | None = None) -> None:
        """Enter ``phase`` (sent with the next heartbeat, at once); ``detail`` goes into its event."""
        with self._lock:
            if phase == self._phase:
                return
            self._phase, self._detail = phase, detail
        self._changed.set()

    def start(self) -> Liveness:
        """Send the first heartbeat from this thread (raises :class:`Fenced` on a 409), then start beating."""
        self._changed.clear()
        if not self.beat():
            self.reporter.close()
            raise self.fenced
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating; a phase entered since the last heartbeat is still sent."""
        self._stop.set()
        self._changed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.every + 10)
        if self.fenced is None and self._phase is not None and self._phase != self._sent_phase:
            self.beat()
        self.reporter.close()

    def __enter__(self) -> Liveness:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _run(self) -> None:
        last_beat = float("-inf")
        while not self._stop.is_set():
            if self.watch is not None:
                try:
                    self.watch(self)
                except Exception:  # a watch that fails must not stop the heartbeats
                    logger.exception("watch failed; heartbeats go on")
            if self._stop.is_set():
                return
            changed = self._changed.is_set()
            if changed or time.monotonic() - last_beat >= self.every:
                self._changed.clear()
                last_beat = time.monotonic()
                if not self.beat():
                    return
            self._changed.wait(min(WATCH_SECONDS, self.every) if self.watch else self.every)

    def beat(self) -> bool:
        """Send one heartbeat; False once the attempt is fenced off."""
        with self._lock:
            phase, detail = self._phase, self._detail
        payload: dict[str, Any] = {}
        if phase is not None and phase != self._sent_phase:
            payload["phase"] = phase
            if detail:
                payload["detail"] = detail
        try:
            taken = self.reporter.send("heartbeat", payload)
        except Fenced as fenced:
            logger.warning("heartbeats stopped: %s", fenced)
            self.fenced = fenced
            return False
        if taken and "phase" in payload:
            self._sent_phase = phase
        return True


class PlacementWatch:
    """Whether this Ray job's placement groups (Ray Train's worker group) wait for resources.

    Between :meth:`begin` (``trainer.fit()`` starts) and the first placement group that Ray created, a
    pending placement group of this job means the cluster lacks what the stage asks for: the phase is
    ``waiting_for_resources`` until it is created (then ``starting``: the worker group starts). After
    ``timeout`` seconds of waiting ``on_timeout(message)`` is called once.
    """

    def __init__(self, launch: StageLaunch, on_timeout: Callable[[str], None]):
        self.resources = launch.resources
        self.timeout = launch.report.schedule_timeout_seconds if launch.report else 1800.0
        self.on_timeout = on_timeout
        self.waiting_since: float | None = None
        self.placed = False
        self._begun = False
        self._timed_out = False

    def begin(self) -> None:
        self._begun = True

    def __call__(self, liveness: Liveness) -> None:
        if not self._begun or self.placed:
            return
        states = job_placement_group_states()
        if "CREATED" in states:
            self.placed = True
            if self.waiting_since is not None:  # the worker group starts now; rank 0 then says "training"
                liveness.set_phase("starting")
            return
        if not any(state in ("PENDING", "RESCHEDULING") for state in states):
            return
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
            liveness.set_phase("waiting_for_resources", self.asked())
        waited = time.monotonic() - self.waiting_since
        if waited >= self.timeout and not self._timed_out:
            self._timed_out = True
            self.on_timeout(self.unschedulable_message(waited))

    def asked(self) -> str:
        r = self.resources
        gpus = f", {r.gpus_per_worker:g} GPUs" if r.gpus_per_worker else ""
        return f"{r.num_workers} workers of {r.cpus_per_worker:g} CPUs{gpus} each"

    def unschedulable_message(self, waited: float) -> str:
        import ray

        r = self.resources
        total = ray.cluster_resources()
        free = ray.available_resources()

        def amounts(resources: dict) -> str:
            return ", ".join(f"{name} {resources.get(name, 0):g}" for name in ("CPU", "GPU"))

        return (f"the stage's workers waited {waited:.0f} s for resources (ALIGN_SCHEDULE_TIMEOUT_SECONDS="
                f"{self.timeout:g}): resources.num_workers={r.num_workers}, resources.cpus_per_worker="
                f"{r.cpus_per_worker:g}, resources.gpus_per_worker={r.gpus_per_worker:g}; the cluster has "
                f"{amounts(total)} in all, {amounts(free)} free; ask for less or add nodes")


def job_placement_group_states() -> list[str]:
    """States (PENDING, CREATED, ...) of the placement groups this Ray job created; a placement group's id
    ends with its creator job's id."""
    import ray

    job_id = ray.get_runtime_context().get_job_id()
    table = ray.util.placement_group_table()
    return [pg["state"] for pg_id, pg in table.items() if pg_id.endswith(job_id) and pg["state"] != "REMOVED"]
