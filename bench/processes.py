"""The bench's processes: where they run, starting, waiting, measuring, ending."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


class TargetUnavailable(RuntimeError):
    """A target did not start or did not become ready; it is skipped."""


@dataclass(frozen=True)
class Cores:
    """The core of each role; all None without taskset or a second core."""

    target: int | None
    load: int | None
    provider: int | None

    @staticmethod
    def plan() -> Cores:
        """Target alone on the first core; load and provider on the others."""
        cores = sorted(os.sched_getaffinity(0))
        if shutil.which("taskset") is None or len(cores) < 2:
            return Cores(None, None, None)
        return Cores(cores[0], cores[1], cores[2] if len(cores) > 2 else cores[1])

    @staticmethod
    def pin(core: int | None) -> list[str]:
        """The command prefix that runs a process on ``core``."""
        return [] if core is None else ["taskset", "-c", str(core)]


class Processes:
    """Every process the run starts, each in its own group, all ended on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self._running: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for process in reversed(self._running):
            self.stop(process)

    def start(
        self, name: str, argv: list[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session, its output going to ``name``'s log."""
        # The bench decides where spans go: none of the caller's OTEL_* settings.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        # A file, not a pipe: llmproxy logs a line per request and must never block.
        with open(self.logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**inherited, "PYTHONPATH": str(ROOT), **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if process in self._running:
            self._running.remove(process)
        for signum, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, signum)
                process.wait(grace)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def tail(self, name: str, lines: int = 6, width: int = 300) -> str:
        """The end of ``name``'s log, for a message about why it failed."""
        with open(self.logs / f"{name}.log", "rb") as log:
            # A request log can be large: read its last 64 KiB only.
            log.seek(max(log.seek(0, os.SEEK_END) - 65536, 0))
            text = log.read().decode(errors="replace")
        return "\n".join(line[:width] for line in text.splitlines()[-lines:])


def free_port() -> int:
    """A port free now; the small race until the server binds it is accepted."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(process: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    """Poll ``url`` until it answers 200; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)  # not listening yet
        if time.monotonic() > deadline:
            message = f"{url} did not answer 200 within {timeout:.0f}s (last: {last})"
            raise TargetUnavailable(message)
        time.sleep(0.05)
    raise TargetUnavailable(f"exited with status {process.returncode}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the parenthesised command name; utime and stime are 14 and 15.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU time of the finished child processes: the load generators."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peak_rss_kb(pid: int) -> int | None:
    """The process's peak resident set size (VmHWM), in KiB."""
    return _status_kb(pid, "VmHWM")


def rss_kb(pid: int) -> int | None:
    """The process's resident set size now (VmRSS), in KiB."""
    return _status_kb(pid, "VmRSS")


def reset_peak_rss(pid: int) -> bool:
    """Start the process's VmHWM afresh from its RSS now; False where Linux refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")  # proc(5): 5 resets the peak resident set size
    except OSError:
        return False
    return True


def _status_kb(pid: int, field: str) -> int | None:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise the soft open-file limit towards ``wanted`` (never past the hard one).

    Child processes inherit it, so calling this before starting them covers the
    provider, the proxies and the load generators. Returns (soft, hard) after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        soft = ceiling
    return soft, hard


def fetch_text(url: str, timeout: float = 5.0) -> str | None:
    """The body of ``GET url`` as text, or None if it cannot be had."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bytes(response.read()).decode()
    except OSError:
        return None


def metric_value(exposition: str, name: str, labels: str = "") -> float | None:
    """One sample from Prometheus text: ``name`` with exactly ``labels``, or the
    sum over every label set when ``labels`` is empty; None when absent."""
    total: float | None = None
    for line in exposition.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] != name:
            continue
        if labels and series != f"{name}{{{labels}}}":
            continue
        total = (total or 0.0) + float(value)
    return total
