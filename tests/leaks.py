"""Leak measurement for socket tests: descriptors, sockets and tasks of this process.

Take a ``Snapshot`` before a scenario and ``await back_to(before)`` after it: the
check polls, since a closed peer is only noticed by the event loop a few turns
later, and on failure names every new descriptor and task. Linux only (it reads
``/proc``); elsewhere the descriptor counts are empty and only tasks are checked.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

_FD_DIR = Path("/proc/self/fd")
_TCP_STATES = {"08": "CLOSE_WAIT", "01": "ESTABLISHED", "06": "TIME_WAIT"}


def open_fds() -> dict[int, str]:
    """Every open descriptor of this process and what it points at."""
    found: dict[int, str] = {}
    if not _FD_DIR.is_dir():
        return found
    for entry in os.listdir(_FD_DIR):
        try:
            found[int(entry)] = os.readlink(_FD_DIR / entry)
        except OSError:  # closed between listing and reading, or the listing itself
            continue
    return found


def close_wait_sockets() -> set[str]:
    """Inodes of this process's sockets whose peer has closed but which are
    still open.

    That state is the signature of a leak: the other side hung up and nobody
    here closed the descriptor.
    """
    inodes = {
        target[8:-1] for target in open_fds().values() if target.startswith("socket:[")
    }
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "08" and cols[9] in inodes:
                found.add(cols[9])
    return found


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from ``/proc/<pid>/statm``."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Snapshot:
    """What this process holds at one moment."""

    fds: dict[int, str] = field(default_factory=open_fds)
    tasks: set[asyncio.Task[object]] = field(default_factory=set)
    # Left half-closed by whatever ran before (an earlier test's pool): not ours.
    close_wait: set[str] = field(default_factory=set)

    @classmethod
    def take(cls) -> Snapshot:
        return cls(open_fds(), _other_tasks(), close_wait_sockets())

    @property
    def sockets(self) -> int:
        return sum(1 for t in self.fds.values() if t.startswith("socket:"))


def _other_tasks() -> set[asyncio.Task[object]]:
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()}


async def back_to(
    before: Snapshot, *, slack: int = 0, task_slack: int = 0, within: float = 5.0
) -> None:
    """Wait until descriptors, sockets and tasks are back to ``before``.

    ``slack`` allows that many more descriptors and ``task_slack`` that many
    more tasks (a pooled keep-alive connection that a scenario legitimately
    opened to an in-process server: two sockets and that server's task).
    Raises ``AssertionError`` naming what is left over once ``within`` seconds
    have passed.
    """
    deadline = time.monotonic() + within
    while True:
        now = Snapshot.take()
        fds_ok = len(now.fds) <= len(before.fds) + slack
        sockets_ok = now.sockets <= before.sockets + slack
        tasks_ok = len(now.tasks) <= len(before.tasks) + task_slack
        lingering = close_wait_sockets() - before.close_wait
        if fds_ok and sockets_ok and tasks_ok and not lingering:
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    new_fds = {fd: t for fd, t in now.fds.items() if before.fds.get(fd) != t}
    new_tasks = [repr(t.get_coro()) for t in now.tasks - before.tasks]
    raise AssertionError(
        f"leaked: fds {len(before.fds)} -> {len(now.fds)} (slack {slack}), "
        f"sockets {before.sockets} -> {now.sockets}, "
        f"tasks {len(before.tasks)} -> {len(now.tasks)}, "
        f"CLOSE_WAIT {len(lingering)}; new fds {new_fds}; new tasks {new_tasks}"
    )
