"""Reports from a stage attempt to the service: POST {report_url}, fenced by (stage_run_id, attempt).

Delivery is best-effort (short timeout, a couple of retries) except for one answer: 409 means the
attempt is stale or its stage run is no longer running, and raises :class:`Fenced` so training stops.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import httpx

from align.artifacts import MANIFEST, ArtifactStore, PublishedArtifact

logger = logging.getLogger(__name__)


class Fenced(RuntimeError):
    """The service answered 409: this attempt must stop and exit non-zero without publishing."""


class Reporter:
    """Sends one attempt's reports. Heartbeats are throttled to one per ``heartbeat_every`` seconds."""

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
        heartbeat_every: float = 5.0,
    ):
        self.url = url
        self.stage_run_id = stage_run_id
        self.attempt = attempt
        self.retries = retries
        self.backoff = backoff
        self.heartbeat_every = heartbeat_every
        self._last_heartbeat = float("-inf")
        self._last_heartbeat_step: int | None = None
        self._client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"})

    def send(self, type_: str, payload: dict[str, Any]) -> bool:
        """POST one report; True once the service took it. Raises :class:`Fenced` on 409."""
        body = {"stage_run_id": self.stage_run_id, "attempt": self.attempt, "type": type_, "payload": payload}
        for attempt in range(self.retries + 1):
            try:
                response = self._client.post(self.url, json=body)
            except httpx.HTTPError as error:
                logger.warning("report %s not delivered (%s)", type_, error)
            else:
                if response.status_code == 409:
                    raise Fenced(f"the service fenced off {self.stage_run_id} attempt {self.attempt}: {response.text}")
                if response.is_success:
                    return True
                logger.warning("report %s answered %s: %s", type_, response.status_code, response.text[:200])
                if response.status_code < 500:
                    return False  # a 401 or 422 will not change on retry
            if attempt < self.retries:
                time.sleep(self.backoff * (attempt + 1))
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
            },
        )

    def failed(self, code: str, message: str, field: str | None, retryable: bool) -> None:
        self.send("failed", {"code": code, "message": message, "field": field, "retryable": retryable})

    def close(self) -> None:
        self._client.close()


def manifest_hash(store: ArtifactStore, uri: str) -> str:
    """``sha256:<hex>`` of the artifact's manifest.json bytes as stored."""
    path = store.fs._strip_protocol(uri).rstrip("/") + "/" + MANIFEST
    with store.fs.open(path, "rb") as reader:
        return "sha256:" + hashlib.sha256(reader.read()).hexdigest()
