"""Wake-ups for live event streams: Postgres LISTEN/NOTIFY where the database is Postgres, else polling.

Whoever writes an event row also sends ``NOTIFY align_events, '<job id>'`` in the same transaction
(Postgres delivers it on commit, and not at all on rollback), from any process: the API, or a
dispatcher of its own. Each API process holds one ``LISTEN`` connection (:class:`EventWaker`) and wakes
the SSE streams of that job. On SQLite, or while the LISTEN connection is down, streams re-read the
database every ``poll_seconds`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

CHANNEL = "align_events"
RECONNECT_SECONDS = 5.0


def notify_event(s: Session, job_id: str) -> None:
    """Tell the listeners, when this transaction commits, that ``job_id`` has new events (Postgres only).

    Once per job and transaction (a savepoint counts as its own): Postgres delivers one notification for
    identical ones sent in a transaction anyway, and each costs a round trip (a new job sends one per stage).
    """
    if s.get_bind().dialect.name != "postgresql":
        return
    transaction = s.get_nested_transaction() or s.get_transaction()
    sent = s.info.get(_SENT)
    if sent is None or sent[0] is not transaction:
        sent = s.info[_SENT] = (transaction, set())
    if job_id not in sent[1]:
        s.execute(text("SELECT pg_notify(:channel, :job_id)"), {"channel": CHANNEL, "job_id": job_id})
        sent[1].add(job_id)


_SENT = "align_notified_jobs"
"""``Session.info`` key: (the transaction, the jobs it has notified)."""


def listen_url(engine: Engine) -> str | None:
    """The libpq URL of ``engine``'s database when it is Postgres, else None."""
    if engine.dialect.name != "postgresql":
        return None
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class EventWaker:
    """Wakes the SSE streams of a job when its events are committed.

    :meth:`run` (a task of the app's lifespan) keeps a ``LISTEN`` connection open, reconnecting after a
    failure. A stream calls :meth:`subscribe`, clears its event before each read of the database, then
    :meth:`wait`s: a notification for its job, or ``timeout`` (``poll_seconds`` while nobody listens).
    """

    def __init__(self, conninfo: str | None, poll_seconds: float):
        self.conninfo = conninfo
        self.poll_seconds = poll_seconds
        self.listening = False
        """True while the LISTEN connection is up: streams then need not poll."""
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._warned = False

    def subscribe(self, job_id: str) -> asyncio.Event:
        wake = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(wake)
        return wake

    def unsubscribe(self, job_id: str, wake: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id, set())
        waiters.discard(wake)
        if not waiters:
            self._waiters.pop(job_id, None)

    async def wait(self, wake: asyncio.Event, timeout: float) -> None:
        """Until ``wake`` is set or ``timeout`` passes; at most ``poll_seconds`` while nobody listens."""
        if not self.listening:
            timeout = min(timeout, self.poll_seconds)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout)

    def _wake(self, job_id: str) -> None:
        for wake in self._waiters.get(job_id, ()):
            wake.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for wake in waiters:
                wake.set()

    async def run(self) -> None:
        """LISTEN until cancelled; after a failure, poll and try again every ``RECONNECT_SECONDS``."""
        if self.conninfo is None:
            return
        import psycopg  # Postgres only: SQLite never needs the driver

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    log.info("live event streams wake on NOTIFY %s", CHANNEL)
                    self._wake_all()  # events committed while nobody listened
                    async for notification in connection.notifies():
                        self._wake(notification.payload)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure: fall back to polling, retry later
                if self.listening or not self._warned:
                    log.warning("LISTEN %s failed (%s: %s); live event streams poll every %.1f s until it "
                                "works again", CHANNEL, type(error).__name__, error, self.poll_seconds)
                    self._warned = True
            finally:
                self.listening = False
            await asyncio.sleep(RECONNECT_SECONDS)
