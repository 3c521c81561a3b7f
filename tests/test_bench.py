"""The benchmark's CI guard: its bounds on synthetic results, then the quick run.

The quick run starts the simulated provider, the bare passthrough and llmproxy
as processes of their own and drives them with wrk and the streaming client;
its bounds compare targets within that one run, never absolute times.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import check  # noqa: E402
import harness  # noqa: E402


def workload(rate: float, p50: float, gap: float = 20.0, ttft: float = 22.0) -> Any:
    return {
        "rate_per_s": rate,
        "latency_ms": {"p50": p50, "p99": p50 * 2},
        "gap_ms": {"p50": gap},
        "ttft_ms": {"p50": ttft},
        "completed": 1000,
        "errors": 0,
        "incomplete": 0,
    }


def target(rate: float, p50: float, gap: float = 20.0, ttft: float = 22.0) -> Any:
    names = ("nonstream_c16", "nonstream_c1", "stream_c16", "paced_c1", "paced_c64")
    return {
        "status": "ok",
        "workloads": {name: workload(rate, p50, gap, ttft) for name in names},
    }


def healthy() -> dict[str, Any]:
    return {
        "targets": {
            "direct": target(6000, 0.5),
            "bare": target(4000, 0.9),
            "llmproxy-off": target(3900, 1.0),
            "llmproxy-full": target(3500, 1.1, ttft=23.0),
        },
        "dead_upstream": {
            "status": "ok",
            "quiet": {"nonstream_c1": workload(800, 1.2)},
            "dead_traffic": {"nonstream_c1": workload(750, 1.4)},
        },
        "memory": {"status": "ok", "rounds": [{"all_completed": True}] * 2},
    }


def test_healthy_results_break_no_bound() -> None:
    assert check.violations(healthy(), allow_skip=False) == []


def test_each_regression_breaks_its_bound() -> None:
    cases: dict[str, tuple[tuple[str, ...], Any]] = {
        "slow": (
            # 0.45x bare: half the passthrough's rate is the floor
            ("targets", "llmproxy-full", "workloads", "nonstream_c16"),
            workload(1800, 1.1),
        ),
        "buffered": (
            ("targets", "llmproxy-full", "workloads", "paced_c64"),
            workload(3500, 1.1, gap=0.1, ttft=330.0),
        ),
        "latency": (
            ("targets", "llmproxy-full", "workloads", "nonstream_c1"),
            workload(3500, 9.0),
        ),
        "dead": (("dead_upstream", "dead_traffic", "nonstream_c1"), workload(300, 5.0)),
        "lost": (("memory", "rounds"), [{"all_completed": True}, {"failed": "x"}]),
    }
    for name, (path, value) in cases.items():
        results = copy.deepcopy(healthy())
        node = results
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert check.violations(results, allow_skip=False), name


def test_a_missing_target_fails_unless_skips_are_allowed() -> None:
    results = healthy()
    results["targets"]["llmproxy-full"] = {"status": "skipped", "reason": "no"}
    assert any("did not run" in p for p in check.violations(results, False))
    assert check.violations(results, allow_skip=True) == []


def test_the_median_round_is_kept_with_every_rounds_rate() -> None:
    rounds = [workload(rate, p50) for rate, p50 in ((900, 1.0), (500, 3.0), (700, 2))]
    kept = harness.median_round(rounds)
    assert kept["rate_per_s"] == 700 and kept["latency_ms"]["p50"] == 2
    assert kept["rounds_per_s"] == [900, 500, 700]
    # Of an even count, the lower middle; a failed round is never the one kept.
    failed = {"failed": "wrk exited 1"}
    kept = harness.median_round([failed, workload(800, 1), workload(600, 1)])
    assert kept["rate_per_s"] == 600 and kept["rounds_per_s"] == [None, 800, 600]
    assert harness.median_round([failed]) == failed
    # One round is reported as it is.
    assert "rounds_per_s" not in harness.median_round([workload(5, 1)])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
def test_quick_bench_holds_its_bounds(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "check.py"), "--seconds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    for name in ("direct", "bare", "llmproxy-off", "llmproxy-full"):
        assert results["targets"][name]["status"] == "ok", name
    assert results["memory"]["rounds"][0]["all_completed"]
