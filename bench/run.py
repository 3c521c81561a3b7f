"""Benchmark llmproxy against the simulated provider itself and a bare aiohttp proxy.

    python bench/run.py [--quick] [--rounds N] [--scenarios main,collector,...]

Every target is measured alone on one core (``taskset -c``); the load generators
and the provider behind the proxies share another. In the main table the targets
take turns, round after round, and the median round of each is kept. Raw
figures go to a JSON file and Markdown tables of figures and ratios are printed.
bench/README.md says what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import plan
import report
import scenarios
from harness import PYTHON, Bench
from processes import ROOT, Cores, Processes, free_port, raise_nofile, wait_ready

BENCH = ROOT / "bench"
# Open files a process may need: a socket per stream on each side of the proxy.
FILES_PER_STREAM = 3


def start_provider(procs: Processes, cores: Cores) -> tuple[str, int]:
    """Start the simulated provider the proxies forward to; return its URL and pid."""
    port = free_port()
    argv = [PYTHON, "-m", "llmproxy.simulator", "--port", str(port)]
    process = procs.start("provider", [*Cores.pin(cores.provider), *argv], {})
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/v1/models", timeout=30)
    return url, process.pid


def metadata(
    args: argparse.Namespace, seconds: float, cores: Cores, nofile: tuple[int, int]
) -> dict[str, Any]:
    """What a reader needs to compare two result files."""
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "scenarios": list(args.scenarios),
        "seconds_per_workload": seconds,
        "rounds": args.rounds,
        "memory_streams": args.streams,
        "cores": vars(cores),
        "unary_load_generator": "wrk" if shutil.which("wrk") else "stream_client.py",
        "cpu": models[0] if models else platform.processor(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "loadavg_at_start": os.getloadavg(),
        "nofile_limit": list(nofile),
        "python": platform.python_version(),
        "commit": commit.strip() or None,
        "workloads": [vars(w) for w in plan.WORKLOADS],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases, for CI")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/)")
    parser.add_argument("--seconds", type=float, help="seconds per workload")
    names = ",".join(t.name for t in plan.TARGETS)
    parser.add_argument("--targets", default=names, help=f"subset of {names}")
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds of each throughput workload in the main table, the targets"
        f" taking turns; the median is kept (default {plan.ROUNDS}; with --quick, 1)",
    )
    every = ",".join(plan.SCENARIOS)
    parser.add_argument(
        "--scenarios",
        help=f"subset of {every}, or all (default: all; with --quick, "
        f"{','.join(plan.QUICK_SCENARIOS)})",
    )
    parser.add_argument(
        "--streams",
        type=int,
        help=f"streams at once in the memory scenario (default "
        f"{plan.MEMORY_STREAMS}; with --quick, {plan.MEMORY_STREAMS_QUICK})",
    )
    args = parser.parse_args(argv)
    try:
        args.scenarios = plan.scenarios(args.scenarios, args.quick)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rounds is None:
        args.rounds = 1 if args.quick else plan.ROUNDS
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.streams is None:
        args.streams = plan.MEMORY_STREAMS_QUICK if args.quick else plan.MEMORY_STREAMS
    return args


def run_bench(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every selected target and scenario; write and print the results."""
    args = parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    cores = Cores.plan()
    if cores.target is None:
        print("no taskset or a single core: processes are not pinned", file=sys.stderr)
    if shutil.which("wrk") is None:
        note = "wrk not found (apt-get install -y wrk): unary load comes from Python"
        print(note, file=sys.stderr)
    # Raised here, before any process starts: every child inherits it.
    nofile = raise_nofile(args.streams * FILES_PER_STREAM + 1024)
    if nofile[0] < args.streams * FILES_PER_STREAM:
        print(
            f"open-file limit {nofile} is low for {args.streams} streams",
            file=sys.stderr,
        )
    meta = metadata(args, seconds, cores, nofile)
    results: dict[str, Any] = {"meta": meta, "targets": {}, "collector": {}}
    with (
        tempfile.TemporaryDirectory(prefix="llmproxy-bench-") as logs,
        Processes(Path(logs)) as procs,
    ):
        bench = Bench(procs, cores, *start_provider(procs, cores), seconds)
        run_scenarios(bench, args, results)
    meta["loadavg_at_end"] = os.getloadavg()
    results["ratios"] = report.ratios(results["targets"])
    if results.get("workers"):
        workers = report.compare(
            results["workers"], report.WORKERS_ROWS, report.WORKERS_BASE
        )
        results["workers_ratios"] = workers.ratios
    write_results(results, args.out or _default_out(args.quick))
    print(report.full_report(results))
    start, end = meta["loadavg_at_start"][0], meta["loadavg_at_end"][0]
    print(
        f"\nload average {start:.2f} at start, {end:.2f} at end; cores {meta['cores']}"
    )
    return results


def run_scenarios(
    bench: Bench, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """Each selected scenario in turn, its results filed under ``results``."""
    if "main" in args.scenarios:
        chosen = [t for t in plan.TARGETS if t.name in args.targets.split(",")]
        results["targets"] = bench.interleaved(chosen, args.rounds)
    if "collector" in args.scenarios:
        for target in plan.COLLECTOR_TARGETS:
            results["collector"][target.name] = bench.target(target)
    if "dead-upstream" in args.scenarios:
        results["dead_upstream"] = scenarios.dead_upstream(bench)
    if "memory" in args.scenarios:
        results["memory"] = scenarios.memory(bench, args.streams)
    if "workers" in args.scenarios:
        results["workers"] = scenarios.workers(bench)


def _default_out(quick: bool) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return BENCH / "results" / f"{stamp}{'-quick' if quick else ''}.json"


def write_results(results: dict[str, Any], path: Path) -> None:
    """Write the raw figures as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}", file=sys.stderr)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Unwind through the finally blocks, which end every process started.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python bench/run.py``."""
    signal.signal(signal.SIGTERM, _terminate)
    run_bench(argv)


if __name__ == "__main__":
    main()
