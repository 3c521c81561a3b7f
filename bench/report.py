"""The bench's figures as rows, ratios between targets, and a Markdown table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# (workload, label, path into that workload's result). A stream's "latency" is the
# time from sending the request to reading the end of the stream.
ROWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("nonstream_c16", "req/s", ("rate_per_s",)),
    ("nonstream_c16", "p50 ms", ("latency_ms", "p50")),
    ("nonstream_c16", "p99 ms", ("latency_ms", "p99")),
    ("nonstream_c16", "CPU us/req", ("cpu_us_per_req",)),
    ("nonstream_c16", "target CPU busy", ("cpu_util",)),
    ("nonstream_c16", "load core busy", ("load_side_cpu_util",)),
    ("nonstream_c1", "req/s", ("rate_per_s",)),
    ("nonstream_c1", "p50 ms", ("latency_ms", "p50")),
    ("nonstream_c1", "p99 ms", ("latency_ms", "p99")),
    ("stream_c16", "streams/s", ("rate_per_s",)),
    ("stream_c16", "TTFB p50 ms", ("ttfb_ms", "p50")),
    ("stream_c16", "total p50 ms", ("latency_ms", "p50")),
    ("stream_c16", "total p99 ms", ("latency_ms", "p99")),
    ("stream_c16", "CPU us/stream", ("cpu_us_per_req",)),
    ("stream_c16", "target CPU busy", ("cpu_util",)),
    ("stream_c16", "load core busy", ("load_side_cpu_util",)),
    ("paced_c1", "TTFT p50 ms", ("ttft_ms", "p50")),
    ("paced_c1", "gap p50 ms", ("gap_ms", "p50")),
    ("paced_c1", "gap p99 ms", ("gap_ms", "p99")),
    ("paced_c64", "streams/s", ("rate_per_s",)),
    ("paced_c64", "TTFT p50 ms", ("ttft_ms", "p50")),
    ("paced_c64", "TTFT p99 ms", ("ttft_ms", "p99")),
    ("paced_c64", "gap p50 ms", ("gap_ms", "p50")),
    ("paced_c64", "gap p99 ms", ("gap_ms", "p99")),
)
BASELINES = ("direct", "bare")


def figure(target: dict[str, Any], workload: str, path: Sequence[str]) -> float | None:
    """One figure of one target, or None where it was not measured."""
    node: Any = target.get("workloads", {}).get(workload)
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return float(node) if isinstance(node, int | float) else None


def ratio_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Which targets to divide by which: every target over each baseline before it."""
    pairs = []
    for i, name in enumerate(names):
        pairs += [(name, base) for base in BASELINES if base in names[:i]]
    return pairs


def table_rows(targets: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Workload, metric, each target's figure, then the ratios, as text cells."""
    names = list(targets)
    rows = []
    for workload, label, path in ROWS:
        values = {name: figure(targets[name], workload, path) for name in names}
        cells = [workload, label, *(_number(values[n]) for n in names)]
        cells += [_ratio(values[a], values[b]) for a, b in ratio_pairs(names)]
        rows.append(cells)
    rss: dict[str, float | None] = {}
    for name in names:
        kib = targets[name].get("peak_rss_kb")
        rss[name] = kib / 1024 if kib else None
    cells = ["process", "peak RSS MiB", *(_number(rss[n]) for n in names)]
    cells += [_ratio(rss[a], rss[b]) for a, b in ratio_pairs(names)]
    return [*rows, cells]


def ratios(targets: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The ratios of the table, keyed ``workload label`` then ``a/b``."""
    names = list(targets)
    out: dict[str, dict[str, float | None]] = {}
    for workload, label, path in ROWS:
        values = {name: figure(targets[name], workload, path) for name in names}
        out[f"{workload} {label}"] = {
            f"{a}/{b}": _divide(values[a], values[b]) for a, b in ratio_pairs(names)
        }
    return out


def markdown(targets: dict[str, dict[str, Any]]) -> str:
    """The table of figures and ratios, with a line per skipped target."""
    names = list(targets)
    head = ["workload", "metric", *names, *(f"{a}/{b}" for a, b in ratio_pairs(names))]
    lines = [_line(head), _line(["---"] * len(head))]
    lines += [_line(row) for row in table_rows(targets)]
    for name, target in targets.items():
        if target.get("status") != "ok":
            lines.append(f"\n{name}: skipped: {target.get('reason')}")
        for workload, result in target.get("workloads", {}).items():
            bad = result.get("errors", 0) + result.get("incomplete", 0)
            if bad:
                lines.append(f"\n{name} {workload}: {bad} errors or cut streams")
    return "\n".join(lines)


def _divide(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratio(a: float | None, b: float | None) -> str:
    value = _divide(a, b)
    return "-" if value is None else f"{value:.2f}x"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
