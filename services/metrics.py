"""Prometheus metrics of the service: HTTP requests, the dispatcher's lease work, and the database's state.

Each :class:`ServiceMetrics` owns its own registry (one per app, one per standalone dispatcher), so two apps
in one process, as in tests, never share counts. Request counts and latencies are labelled by the route's
template (``/jobs/{job_id}``), never the raw path, so ids cannot multiply the series. Values that live in
the database (jobs and stage runs by state, the queue, stage durations, failures, training throughput) are
read by :class:`DatabaseCollector` when Prometheus scrapes, from :mod:`services.db.stats`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import Mount

from services.db import stats
from services.db.models import JOB_STATUSES, STAGE_STATES, utcnow

log = logging.getLogger(__name__)

UNMATCHED_ROUTE = "unmatched"
"""The ``route`` label of a request no route matched (a 404 for an unknown path)."""
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
OTHER_METHOD = "other"
"""The ``method`` label of a request whose method HTTP does not define (a client may send any token)."""
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_DURATION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)


class DispatcherMetrics:
    """What a dispatcher counts in the process it runs in (``align serve`` or ``align dispatcher``)."""

    def __init__(self, registry: CollectorRegistry):
        self.lease_renewals = Counter(
            "align_dispatcher_lease_renewals", "Leases the dispatcher renewed while Ray prepared a stage's job",
            registry=registry)
        self.rescues = Counter(
            "align_dispatcher_rescues", "Stage attempts whose lease expired: Ray job stopped, stage requeued or failed",
            registry=registry)
        self.failed_attempts = Counter(
            "align_dispatcher_failed_attempts", "Stage attempts the dispatcher ended as failed, by error code and "
            "what followed (queued: retried; failed: for good)", ["error_code", "outcome"], registry=registry)


class ServiceMetrics:
    """The registry ``GET /metrics`` serves, with the counters code in this process increments."""

    def __init__(self, session_factory: sessionmaker[Session] | None = None):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter("align_http_requests", "HTTP requests answered, by method, route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.request_seconds = Histogram(
            "align_http_request_duration_seconds", "Time until the response started (headers sent), by method, "
            "route template and status", ["method", "route", "status"], buckets=REQUEST_BUCKETS,
            registry=self.registry)
        self.database_unavailable = Counter(
            "align_http_database_unavailable", "Requests answered 503 with Retry-After because the database could "
            "not be reached, by route template (also counted in align_http_requests)", ["route"],
            registry=self.registry)
        self.dispatcher = DispatcherMetrics(self.registry)
        if session_factory is not None:
            self.registry.register(DatabaseCollector(session_factory))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route, str(status)).observe(seconds)


class RequestMetricsMiddleware:
    """ASGI middleware counting each HTTP request by method, matched route template and status, and timing it
    until its response starts (for a live event stream: until the stream opens)."""

    def __init__(self, app: Any, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        observed = False

        async def send_observed(message: dict) -> None:
            nonlocal observed
            if message["type"] == "http.response.start" and not observed:
                observed = True
                self.metrics.observe_request(method_label(scope), route_template(scope), message["status"],
                                             time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except BaseException:
            if not observed:  # the server answers 500 for an error no handler took
                self.metrics.observe_request(method_label(scope), route_template(scope), 500,
                                             time.perf_counter() - started)
            raise


def method_label(scope: dict) -> str:
    method = scope["method"]
    return method if method in HTTP_METHODS else OTHER_METHOD


def route_template(scope: dict) -> str:
    """The path template of the route that matched (``/jobs/{job_id}``; a mount's prefix), else ``unmatched``."""
    route = scope.get("route")
    if route is None:
        # A mount (the dashboard's static files) leaves its app as the endpoint, not itself as the route.
        endpoint = scope.get("endpoint")
        app = scope.get("app")
        route = next((r for r in getattr(app, "routes", ()) if isinstance(r, Mount) and r.app is endpoint), None)
        if endpoint is None or route is None:
            return UNMATCHED_ROUTE
    return getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED_ROUTE


class DatabaseCollector:
    """Reads the state of jobs and stage runs from the database at each scrape (:mod:`services.db.stats`).

    ``align_metrics_database_up`` is 0 when the database did not answer; the other families are then left out
    rather than reported as zero.
    """

    def __init__(self, session_factory: sessionmaker[Session]):
        self.session_factory = session_factory

    def describe(self) -> list:
        return []  # collected only at scrape time: registering must not query the database

    def collect(self):
        up = GaugeMetricFamily("align_metrics_database_up", "1 when the database answered this scrape's queries")
        try:
            with self.session_factory() as s:
                families = list(self._families(s))
        except SQLAlchemyError as error:
            log.warning("metrics: the database did not answer: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, s: Session):
        by_status = stats.jobs_by_status(s)
        jobs = GaugeMetricFamily("align_jobs", "Jobs by derived status", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs

        counts = stats.stage_runs_by_type_and_state(s)
        runs = GaugeMetricFamily("align_stage_runs", "Stage runs by stage type and state", labels=["type", "state"])
        for type_ in sorted({type_ for type_, _ in counts}):
            for state in STAGE_STATES:
                runs.add_metric([type_, state], counts.get((type_, state), 0))
        yield runs

        depth, oldest = stats.queue(s)
        yield GaugeMetricFamily("align_queue_depth", "Stage runs queued for a dispatcher to claim", value=depth)
        age = max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0
        yield GaugeMetricFamily("align_queue_oldest_age_seconds",
                                "Seconds the longest-queued stage run has waited (0 when none is queued)", value=age)

        durations = HistogramMetricFamily(
            "align_stage_duration_seconds", "Finished stage runs, from their last attempt's start to their end, "
            "by stage type and final state", labels=["type", "state"])
        for (type_, state), hist in sorted(stats.stage_durations(s, STAGE_DURATION_BUCKETS).items()):
            buckets = [(floatToGoString(b), n) for b, n in zip(STAGE_DURATION_BUCKETS, hist.buckets)]
            durations.add_metric([type_, state], [*buckets, ("+Inf", hist.count)], hist.total_seconds)
        yield durations

        failed = CounterMetricFamily("align_stage_failures", "Stage runs that failed for good, by stage type and "
                                     "error code", labels=["type", "error_code"])
        for (type_, code), count in sorted(stats.failures(s).items()):
            failed.add_metric([type_, code], count)
        yield failed

        rates = stats.training_rates(s)
        for key, name, what in (("tokens_per_s", "align_training_tokens_per_second", "tokens"),
                                ("samples_per_s", "align_training_samples_per_second", "samples")):
            family = GaugeMetricFamily(name, f"Training {what} per second of the running stage runs of each type, "
                                       "summed, from each one's latest training record", labels=["type"])
            for type_, values in sorted(rates.items()):
                if key in values:
                    family.add_metric([type_], values[key])
            yield family

