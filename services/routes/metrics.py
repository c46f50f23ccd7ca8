"""``GET /metrics``: the service's metrics in Prometheus' text format (or OpenMetrics when asked for).

Unauthenticated, like ``/healthz``: Prometheus scrapes it. It tells counts and rates, never a job's spec,
data or tenant; keep it on the cluster network (the deployment's NetworkPolicy) if those counts are private.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

router = APIRouter(tags=["monitoring"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format"}})
def metrics(request: Request) -> Response:
    """Request counts and latencies, jobs and stage runs by state, the queue, stage durations, failures,
    training throughput and the dispatcher's lease work (names and labels: docs/observe.md)."""
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(request.app.state.metrics.registry), media_type=content_type)
