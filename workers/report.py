"""Reports from a stage attempt to the service: POST to the launch's ``report.url``, fenced by (stage_run_id, attempt).

A report the service cannot take now (unreachable, 5xx) is retried with jittered exponential back-off
(tenacity), then kept in order and sent again before the next report; :meth:`Reporter.close` keeps
trying with back-off until its ``deadline`` and then logs what was never delivered. A 503 with
``Retry-After`` (the service's database is down) is not retried at once: the reports wait, and training
goes on without waiting for them, until that time has passed. Answers that will
not change on retry (401, 422) are logged as errors and not retried. 409 means the attempt is stale
or its stage run is no longer running, and raises :class:`Fenced` so training stops; so does a 401 that
says the report token expired (:class:`TokenExpired`): the service would take none of the attempt's
reports, its artifact included.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from typing import Any

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from align.artifacts import MANIFEST, ArtifactStore, PublishedArtifact
from align.json_values import finite_json

logger = logging.getLogger(__name__)

MAX_HELD_REPORTS = 10_000


class Fenced(RuntimeError):
    """The service answered 409: this attempt must stop and exit non-zero without publishing."""


class TokenExpired(Fenced):
    """The service answered 401 "report token expired": it takes no more reports from this attempt,
    which stops as a fenced-off one does (the dispatcher then retries the stage with a new token)."""


class _NotTaken(Exception):
    """The service could not take a report now (no connection, or a 5xx): worth another try, after
    ``retry_after`` seconds when the service said when."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_now(error: BaseException) -> bool:
    return isinstance(error, _NotTaken) and error.retry_after is None


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The ``Retry-After`` of an answer in seconds (a number of seconds; an HTTP date is not used), or None."""
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


class Reporter:
    """Sends one attempt's reports. Heartbeats are throttled to one per ``heartbeat_every`` seconds.

    Each delivery makes up to ``retries + 1`` tries; after try n fails it waits a random time of up to
    ``backoff * 2**(n - 1)`` seconds (capped at ``max_backoff``; tenacity's ``wait_random_exponential``):
    with the defaults up to 0.5 s before the second try and 1 s before the third. Reports that still
    are not taken wait in order for the next delivery (a newer heartbeat replaces a held one). After a
    503 with ``Retry-After`` (capped at ``max_backoff``) no delivery is tried until that time has passed: the
    reports sent meanwhile are held at once, so training does not wait on a service that said when to come back.
    At :meth:`close` held reports (the artifact among them) are tried again, with back-off from ``backoff``
    up to ``max_backoff``, for up to ``deadline`` seconds: a service that restarts meanwhile still gets them.
    """

    def __init__(
        self,
        url: str,
        token: str,
        stage_run_id: str,
        attempt: int,
        *,
        timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        heartbeat_every: float = 5.0,
        deadline: float = 300.0,
        sleep=time.sleep,
    ):
        self.url = url
        self.stage_run_id = stage_run_id
        self.attempt = attempt
        self.heartbeat_every = heartbeat_every
        self.deadline = deadline
        self._backoff, self._max_backoff, self._sleep = backoff, max_backoff, sleep
        self.held: deque[dict[str, Any]] = deque()
        """Reports not yet taken by the service, oldest first."""
        self._retrying = Retrying(
            stop=stop_after_attempt(retries + 1),
            wait=wait_random_exponential(multiplier=backoff, max=max_backoff),
            retry=retry_if_exception(_retry_now),
            sleep=sleep,
        )
        self._not_before = float("-inf")
        """No delivery is tried before this ``time.monotonic()``: the service's ``Retry-After``."""
        self._last_heartbeat = float("-inf")
        self._last_heartbeat_step: int | None = None
        self._client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"})

    def send(self, type_: str, payload: dict[str, Any]) -> bool:
        """Deliver the held reports, then this one; True once the service took it.

        Raises :class:`Fenced` on 409, and :class:`TokenExpired` (a :class:`Fenced`) once the token expired."""
        # JSON has no NaN or Infinity (a diverged loss): they go as the strings "NaN", "Infinity", "-Infinity".
        body = {"stage_run_id": self.stage_run_id, "attempt": self.attempt, "type": type_,
                "payload": finite_json(payload)}
        if type_ == "heartbeat":
            # Progress only: a newer heartbeat says all that an older held one would.
            self.held = deque(held for held in self.held if held["type"] != "heartbeat")
        if len(self.held) >= MAX_HELD_REPORTS:
            dropped = self.held.popleft()
            logger.error("report %s dropped: %d reports are held for a service that does not take them",
                         dropped["type"], MAX_HELD_REPORTS)
        self.held.append(body)
        return any(taken is body for taken in self._deliver_held())

    def _deliver_held(self) -> list[dict[str, Any]]:
        """Send held reports oldest first, until the service cannot take one now (it stays held).

        Returns the reports the service took."""
        taken = []
        while self.held and time.monotonic() >= self._not_before:
            body = self.held[0]
            try:
                accepted = self._retrying(self._post, body)
            except Fenced:
                self.held.clear()  # the service takes nothing more from a fenced-off attempt
                raise
            except RetryError as gave_up:
                logger.warning("report %s not delivered after %d tries (%s); %d held, sent again with the "
                               "next report", body["type"], gave_up.last_attempt.attempt_number,
                               gave_up.last_attempt.exception(), len(self.held))
                break
            except _NotTaken as later:
                wait = min(later.retry_after, self._max_backoff)
                self._not_before = time.monotonic() + wait
                logger.warning("report %s not delivered (%s); %d held, sent again in %.1f s", body["type"], later,
                               len(self.held), wait)
                break
            self.held.popleft()
            if accepted:
                taken.append(body)
        return taken

    def _post(self, body: dict[str, Any]) -> bool:
        """One try: True when taken, False when refused for good; raises :class:`_NotTaken` or :class:`Fenced`."""
        try:
            response = self._client.post(self.url, json=body)
        except httpx.HTTPError as error:
            raise _NotTaken(f"{type(error).__name__}: {error}") from None
        if response.status_code == 409:
            raise Fenced(f"the service fenced off {self.stage_run_id} attempt {self.attempt}: {response.text}")
        if response.status_code == 401 and "report token expired" in response.text:
            raise TokenExpired(f"the service takes no more reports from {self.stage_run_id} attempt "
                               f"{self.attempt}: {response.text[:300]}")
        if response.is_success:
            return True
        if response.status_code >= 500:
            retry_after = retry_after_seconds(response) if response.status_code == 503 else None
            raise _NotTaken(f"answered {response.status_code}: {response.text[:200]}", retry_after)
        # A 401 or 422 will not change on retry.
        logger.error("report %s refused with %s, not sent again: %s", body["type"], response.status_code,
                     response.text[:300])
        return False

    def heartbeat(self, step: int, total_steps: int, force: bool = False) -> None:
        """Send progress unless one went out in the last ``heartbeat_every`` seconds or for this step."""
        now = time.monotonic()
        due = force or now - self._last_heartbeat >= self.heartbeat_every
        if due and step != self._last_heartbeat_step:
            self._last_heartbeat, self._last_heartbeat_step = now, step
            self.send("heartbeat", {"step": step, "total_steps": total_steps})

    def metrics(self, record: dict) -> None:
        self.send("metrics", record)

    def checkpoint(self, step: int, uri: str) -> None:
        self.send("checkpoint", {"step": step, "uri": uri})

    def message(self, text: str, level: str = "info") -> None:
        self.send("message", {"level": level, "text": text})

    def samples(self, records: list[dict]) -> None:
        """Sampled completions of an online stage: records with step, prompt, completion and score."""
        self.send("samples", {"samples": list(records)})

    def artifact(self, store: ArtifactStore, published: PublishedArtifact) -> None:
        manifest = published.manifest
        self.send(
            "artifact",
            {
                "artifact_id": manifest.artifact_id,
                "uri": published.uri,
                "lineage": manifest.lineage,
                "version": manifest.version,
                "kind": manifest.kind,
                "manifest_hash": manifest_hash(store, published.uri),
                "parents": list(manifest.parents),
                "metrics": manifest.metrics,
                "gate": manifest.gate,
                "size_bytes": sum(entry["size"] for entry in manifest.files.values()),
            },
        )

    def failed(self, code: str, message: str, field: str | None, retryable: bool) -> None:
        self.send("failed", {"code": code, "message": message, "field": field, "retryable": retryable})

    def close(self) -> None:
        """Try held reports again until they are taken or ``deadline`` seconds have passed; the ones still not
        taken are logged, never dropped silently."""
        try:
            give_up_at = time.monotonic() + self.deadline
            pause = self._backoff
            while self.held:
                try:
                    self._deliver_held()
                except Fenced as fenced:
                    logger.warning("held reports not sent: %s", fenced)
                    break
                left = give_up_at - time.monotonic()
                if not self.held or left <= 0:
                    break
                told = self._not_before - time.monotonic()  # what is left of the service's Retry-After
                self._sleep(min(told if told > 0 else pause, left))
                pause = min(pause * 2, self._max_backoff)
            if self.held:
                kinds = ", ".join(sorted({held["type"] for held in self.held}))
                logger.error("%d reports (%s) of %s attempt %d were never delivered to %s; gave up after the "
                             "%g s deadline", len(self.held), kinds, self.stage_run_id, self.attempt, self.url,
                             self.deadline)
        finally:
            self._client.close()


def manifest_hash(store: ArtifactStore, uri: str) -> str:
    """``sha256:<hex>`` of the artifact's manifest.json bytes as stored."""
    path = store.fs._strip_protocol(uri).rstrip("/") + "/" + MANIFEST
    with store.fs.open(path, "rb") as reader:
        return "sha256:" + hashlib.sha256(reader.read()).hexdigest()
