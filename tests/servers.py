"""An app served by uvicorn from a thread of the test process, for tests that need a real HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from align.ports import free_port


@contextmanager
def served(app, port: int | None = None, **config) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (``port``, else a free one) until the block ends; yields its URL once it
    accepts connections. ``config`` goes to :class:`uvicorn.Config` (``limit_concurrency``, ...)."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
