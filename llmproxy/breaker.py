"""Circuit breakers, one per upstream, on the ``circuitbreaker`` package.

The package keeps the state (closed, open, half-open after ``reset_after``); this
module adds what it lacks, and keeps it away from what it gets wrong for a proxy:

- it is never called through its decorator: ``admit`` refuses requests itself,
  before anything is sent, so an open breaker costs microseconds;
- outcomes are fed to it explicitly through its context-manager protocol, and
  only two kinds: an upstream fault, or a success. Anything else (a caller's
  4xx, a rate limit, a client that went away, a cancelled task) is neutral and
  never reaches the package, which would otherwise reset itself to closed;
- failures count within a sliding ``window``, not merely in a row;
- half-open admits at most ``half_open_trials`` requests at a time;
- every transition sets ``llmproxy_circuit_breaker_state`` and logs
  ``breaker.state.changed``, including the timed open-to-half-open one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from circuitbreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker

from .config import Breaker as BreakerSettings
from .errors import CircuitOpenError

log = logging.getLogger(__name__)

STATE_VALUES = {STATE_CLOSED: 0, STATE_OPEN: 1, STATE_HALF_OPEN: 2}
# Outcomes that show the upstream itself is failing.
FAULTS = frozenset(
    {
        "connect_error",
        "timeout_connect",
        "timeout_first_byte",
        "timeout_idle",
        "timeout_total",
        "upstream_5xx",
        "overloaded",
        "malformed_response",
        "stream_truncated",
    }
)


class _UpstreamFault(Exception):
    """What the package is told failed; it never escapes this module."""


class Breaker:
    """One upstream's breaker."""

    def __init__(
        self,
        upstream: str,
        settings: BreakerSettings,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.settings = settings
        self._cb = CircuitBreaker(
            failure_threshold=settings.failures,
            # The package treats 0 as "use the default"; a tiny value means "now".
            recovery_timeout=settings.reset_after or 1e-9,
            expected_exception=_UpstreamFault,
            name=f"llmproxy:{upstream}",
        )
        self._failures: deque[float] = deque()
        self._trials = 0
        self._reported = STATE_CLOSED
        # When it last opened (monotonic): health ages a half-open state by it.
        self.opened_at: float | None = None
        self._on_change = on_change
        self._timer: asyncio.TimerHandle | None = None

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``, reporting any timed transition."""
        state: str = self._cb.state
        if state != self._reported:
            self._report(state)
        return state

    def admit(self) -> bool:
        """Let a request through, or raise ``CircuitOpenError``.

        Returns whether the request is a half-open trial; the caller must pass
        that to ``record`` when the outcome is known.
        """
        state = self.state
        if state == STATE_CLOSED:
            return False
        if state == STATE_HALF_OPEN and self._trials < self.settings.half_open_trials:
            self._trials += 1
            return True
        retry_after = max(float(self._cb.open_remaining), 1.0)
        raise CircuitOpenError(
            f"circuit open for upstream {self.upstream!r}",
            upstream=self.upstream,
            retry_after=retry_after,
        )

    def record(self, trial: bool, error_type: str | None, status: int) -> None:
        """Feed one finished attempt's outcome."""
        if trial:
            self._trials -= 1
        if error_type in FAULTS or (error_type is None and status >= 500):
            self._fault(trial)
        elif error_type is None and status < 400:
            self._success(trial)
        # Anything else is neutral: the caller's 4xx, 429, a client disconnect.

    def _fault(self, trial: bool) -> None:
        state = self.state
        if state == STATE_OPEN or (state == STATE_HALF_OPEN and not trial):
            # A request admitted before the breaker (re)opened failed afterwards:
            # the outage is already known, and must not push the half-open time back.
            return
        trial = state == STATE_HALF_OPEN
        now = time.monotonic()
        window = self.settings.window
        failures = self._failures
        failures.append(now)
        while window and failures and now - failures[0] > window:
            failures.popleft()
        if trial or len(failures) >= self.settings.failures:
            # Trip the package: it opens once it has seen its threshold.
            for _ in range(self.settings.failures):
                self._cb.__exit__(_UpstreamFault, _UpstreamFault(), None)
            failures.clear()
            self._report(STATE_OPEN)

    def _success(self, trial: bool) -> None:
        # Only a half-open trial closes the breaker. A success that was admitted
        # before the breaker opened says nothing about the upstream now.
        if trial and self.state == STATE_HALF_OPEN:
            self._cb.__exit__(None, None, None)  # the package's reset: closed
            self._failures.clear()
            self._report(STATE_CLOSED)

    def _report(self, state: str) -> None:
        if state == self._reported:
            return
        previous, self._reported = self._reported, state
        log.warning(
            "breaker.state.changed",
            extra={
                "fields": {"upstream": self.upstream, "from": previous, "to": state}
            },
        )
        if self._on_change is not None:
            self._on_change(self.upstream, state)
        if state == STATE_OPEN:
            self.opened_at = time.monotonic()
            self._schedule_half_open()

    def _schedule_half_open(self) -> None:
        """Report the timed move to half-open when it happens, not at the next call."""
        if self._timer is not None:
            self._timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = self.settings.reset_after + 0.001
        self._timer = loop.call_later(delay, lambda: self.state)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
