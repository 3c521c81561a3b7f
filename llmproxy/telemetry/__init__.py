"""Telemetry: what becomes of each finished exchange, off the request path.

``Recorder.record`` is called by the forwarding handler when a request ends, and
only queues the exchange. The queue is drained by a callback that runs after the
handler has returned, so no sink (logs, metrics, spans) ever adds to a
request's latency; a sink that raises is logged and the others still run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from ..exchange import Exchange

log = logging.getLogger(__name__)

Sink = Callable[[Exchange], None]

# The telemetry threads (the log writer, the span export) share the proxy's core
# with the event loop: after each slice of this many lines or exchanges they
# pause, so that a loop waiting behind them gets the CPU and the interpreter now
# rather than when the scheduler takes the thread off.
PAUSE_EVERY = 32
PAUSE_S = 0.0001


def pause() -> None:
    """Block the calling telemetry thread for a moment: the event loop goes first."""
    time.sleep(PAUSE_S)


class Recorder:
    """Fans finished exchanges out to the sinks, batched per event-loop turn."""

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])
        self._queue: deque[Exchange] = deque()
        self._scheduled = False

    def __call__(self, ex: Exchange) -> None:
        self._queue.append(ex)
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: record at once
                self.flush()

    def flush(self) -> None:
        """Hand every queued exchange to every sink."""
        self._scheduled = False
        queue = self._queue
        while queue:
            ex = queue.popleft()
            for sink in self.sinks:
                try:
                    sink(ex)
                except Exception:
                    log.exception("telemetry.sink_failed")
