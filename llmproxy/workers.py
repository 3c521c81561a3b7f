"""Worker processes: ``llmproxy serve --workers N``.

The supervisor validates the configuration, then runs N copies of
``llmproxy serve`` as child processes sharing the proxy port through
``SO_REUSEPORT`` (the kernel spreads connections among them) and a directory
for prometheus_client's shared metric files. Worker 0 also serves the admin
port and runs the health probes, so ``/metrics`` adds up all workers and
``/health`` is reported once.

A worker that dies is started again, after a pause that grows while it keeps
dying. SIGTERM or SIGINT is passed on to every worker, which drains as a single
process would; the supervisor exits 0 once they all have.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

_POLL = 0.2  # seconds between checks on the workers
_MAX_RESTART_DELAY = 30.0


def default_workers() -> int:
    """One worker per CPU this process may use: its affinity, capped by a cgroup
    CPU quota (a container's CPU limit, which affinity does not show)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, quota)) if quota else cpus


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs allowed by a cgroup v2 quota, rounded up; ``None`` when unlimited."""
    try:
        quota, period = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


class Supervisor:
    """Starts, restarts and stops the worker processes."""

    def __init__(self, count: int, worker_args: list[str], grace: float) -> None:
        self.count = count
        self.worker_args = worker_args
        self.grace = grace
        self.metrics_dir = tempfile.mkdtemp(prefix="llmproxy-metrics-")
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.failures: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        try:
            for index in range(self.count):
                self._spawn(index)
            while not self.stopping:
                self._watch()
                time.sleep(_POLL)
            return self._shutdown()
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _spawn(self, index: int) -> None:
        args = [sys.executable, "-m", "llmproxy", "serve", *self.worker_args]
        proc = subprocess.Popen([*args, "--worker", str(index)], env=self.env)
        self.procs[index] = proc
        log.info("worker.started", extra={"fields": {"worker": index, "pid": proc.pid}})

    def _watch(self) -> None:
        now = time.monotonic()
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            from prometheus_client import multiprocess

            # Live gauges of a dead worker must stop counting.
            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            del self.procs[index]
            self.failures[index] = self.failures.get(index, 0) + 1
            delay = min(2.0 ** (self.failures[index] - 1) * 0.5, _MAX_RESTART_DELAY)
            self.restart_at[index] = now + delay
            log.error(
                "worker.exited",
                extra={"fields": {"worker": index, "pid": proc.pid, "code": code,
                                  "restart_in_s": delay}},
            )  # fmt: skip
        for index, due in list(self.restart_at.items()):
            if now >= due:
                del self.restart_at[index]
                self._spawn(index)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _shutdown(self) -> int:
        log.info("workers.stopping", extra={"fields": {"grace_s": self.grace}})
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 5.0
        codes = []
        for proc in self.procs.values():
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        log.info("workers.stopped", extra={"fields": {"codes": codes}})
        # A worker still starting when SIGTERM came had nothing to drain: its
        # default action ending it is a clean stop too.
        clean = (0, -signal.SIGTERM)
        return 0 if all(code in clean for code in codes) else 1
