"""The bench's figures as rows, ratios between targets, and Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

Result = dict[str, Any]


class Row:
    """One figure of a workload: its label, path into the result, and unit scale."""

    __slots__ = ("label", "path", "scale", "workload")

    def __init__(
        self, workload: str, label: str, path: tuple[str, ...], scale: float = 1.0
    ) -> None:
        self.workload, self.label, self.path, self.scale = workload, label, path, scale

    def value(self, target: Result) -> float | None:
        """This row's figure of ``target``, scaled, or None."""
        raw = figure(target, self.workload, self.path)
        return None if raw is None else raw * self.scale


MIB = 1 / 1024  # figures are read in KiB
# A stream's "latency" is the time from sending the request to reading its end.
ROWS = (
    Row("nonstream_c16", "req/s", ("rate_per_s",)),
    Row("nonstream_c16", "p50 ms", ("latency_ms", "p50")),
    Row("nonstream_c16", "p99 ms", ("latency_ms", "p99")),
    Row("nonstream_c16", "CPU us/req", ("cpu_us_per_req",)),
    Row("nonstream_c16", "target CPU busy", ("cpu_util",)),
    Row("nonstream_c16", "load core busy", ("load_side_cpu_util",)),
    Row("nonstream_c1", "req/s", ("rate_per_s",)),
    Row("nonstream_c1", "p50 ms", ("latency_ms", "p50")),
    Row("nonstream_c1", "p99 ms", ("latency_ms", "p99")),
    Row("stream_c16", "streams/s", ("rate_per_s",)),
    Row("stream_c16", "TTFB p50 ms", ("ttfb_ms", "p50")),
    Row("stream_c16", "total p50 ms", ("latency_ms", "p50")),
    Row("stream_c16", "total p99 ms", ("latency_ms", "p99")),
    Row("stream_c16", "CPU us/stream", ("cpu_us_per_req",)),
    Row("stream_c16", "target CPU busy", ("cpu_util",)),
    Row("stream_c16", "load core busy", ("load_side_cpu_util",)),
    Row("paced_c1", "TTFT p50 ms", ("ttft_ms", "p50")),
    Row("paced_c1", "gap p50 ms", ("gap_ms", "p50")),
    Row("paced_c1", "gap p99 ms", ("gap_ms", "p99")),
    Row("paced_c64", "streams/s", ("rate_per_s",)),
    Row("paced_c64", "TTFT p50 ms", ("ttft_ms", "p50")),
    Row("paced_c64", "TTFT p99 ms", ("ttft_ms", "p99")),
    Row("paced_c64", "gap p50 ms", ("gap_ms", "p50")),
    Row("paced_c64", "gap p99 ms", ("gap_ms", "p99")),
    Row("paced_c64", "peak RSS MiB", ("peak_rss_kb",), MIB),
)
# The main table's ratios, in this order, where both targets ran.
RATIO_PAIRS = (
    ("llmproxy-full", "bare"),
    ("llmproxy-full", "direct"),
    ("llmproxy-off", "bare"),
    ("llmproxy-full", "llmproxy-off"),
)
COLLECTOR_BASE = "llmproxy-full"
COLLECTOR_ROWS = (
    Row("nonstream_c1", "req/s", ("rate_per_s",)),
    Row("nonstream_c1", "p50 ms", ("latency_ms", "p50")),
    Row("nonstream_c1", "p99 ms", ("latency_ms", "p99")),
    Row("stream_c16", "streams/s", ("rate_per_s",)),
    Row("stream_c16", "TTFB p50 ms", ("ttfb_ms", "p50")),
    Row("stream_c16", "TTFB p99 ms", ("ttfb_ms", "p99")),
)
DEAD_UPSTREAM_ROWS = (
    Row("nonstream_c1", "req/s", ("rate_per_s",)),
    Row("nonstream_c1", "p50 ms", ("latency_ms", "p50")),
    Row("nonstream_c1", "p99 ms", ("latency_ms", "p99")),
    Row("nonstream_c1", "target CPU busy", ("cpu_util",)),
    Row("paced_c1", "TTFB p50 ms", ("ttfb_ms", "p50")),
    Row("paced_c1", "TTFB p99 ms", ("ttfb_ms", "p99")),
    Row("paced_c1", "TTFT p50 ms", ("ttft_ms", "p50")),
    Row("paced_c1", "gap p50 ms", ("gap_ms", "p50")),
)

WORKERS_BASE = "workers-1"
WORKERS_ROWS = (
    Row("nonstream_c16", "req/s", ("rate_per_s",)),
    Row("nonstream_c16", "p50 ms", ("latency_ms", "p50")),
    Row("nonstream_c16", "p99 ms", ("latency_ms", "p99")),
    Row("stream_c16", "streams/s", ("rate_per_s",)),
    Row("stream_c16", "TTFB p50 ms", ("ttfb_ms", "p50")),
    Row("stream_c16", "total p99 ms", ("latency_ms", "p99")),
)


def figure(target: Result, workload: str, path: Sequence[str]) -> float | None:
    """One figure of one target, or None where it was not measured."""
    node: Any = target.get("workloads", {}).get(workload)
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return float(node) if isinstance(node, int | float) else None


def ratio_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """The pairs of RATIO_PAIRS whose targets are both among ``names``."""
    return [(a, b) for a, b in RATIO_PAIRS if a in names and b in names]


def table_rows(targets: dict[str, Result]) -> list[list[str]]:
    """Workload, metric, each target's figure, then the ratios, as text cells."""
    names = list(targets)
    pairs = ratio_pairs(names)
    rows = []
    for row in ROWS:
        values = {name: row.value(targets[name]) for name in names}
        cells = [row.workload, row.label, *(_number(values[n]) for n in names)]
        rows.append(cells + [_ratio(values[a], values[b]) for a, b in pairs])
    rss = {name: _mib(targets[name].get("peak_rss_kb")) for name in names}
    cells = ["whole run", "peak RSS MiB", *(_number(rss[n]) for n in names)]
    return [*rows, cells + [_ratio(rss[a], rss[b]) for a, b in pairs]]


def ratios(targets: dict[str, Result]) -> dict[str, dict[str, float | None]]:
    """The ratios of the main table, keyed ``workload label`` then ``a/b``."""
    names = list(targets)
    out: dict[str, dict[str, float | None]] = {}
    for row in ROWS:
        values = {name: row.value(targets[name]) for name in names}
        out[f"{row.workload} {row.label}"] = {
            f"{a}/{b}": divide(values[a], values[b]) for a, b in ratio_pairs(names)
        }
    return out


def markdown(targets: dict[str, Result]) -> str:
    """The main table of figures and ratios, with a line per skipped target."""
    names = list(targets)
    head = ["workload", "metric", *names, *(f"{a}/{b}" for a, b in ratio_pairs(names))]
    lines = [_line(head), _line(["---"] * len(head))]
    lines += [_line(row) for row in table_rows(targets)]
    return "\n".join(lines + _notes(targets))


def _notes(targets: dict[str, Result]) -> list[str]:
    """Skipped targets, failed workloads, dropped requests, what the collector got."""
    lines = []
    for name, target in targets.items():
        if target.get("status") != "ok":
            lines.append(f"\n{name}: skipped: {target.get('reason')}")
        for workload, result in target.get("workloads", {}).items():
            if "failed" in result:
                lines.append(f"\n{name} {workload}: failed: {result['failed']}")
                continue
            bad = result.get("errors", 0) + result.get("incomplete", 0)
            if bad:
                lines.append(f"\n{name} {workload}: {bad} errors or cut streams")
        received = target.get("collector_received")
        if received is not None:
            spans = target.get("telemetry") or {}
            lines.append(
                f"\n{name}: the collector received {received['spans']:,} spans in "
                f"{received['exports']:,} exports; llmproxy dropped "
                f"{_count(spans.get('spans_dropped'))}, failed to export "
                f"{_count(spans.get('spans_export_failed'))}"
            )
    return lines


class Comparison(NamedTuple):
    """Figures of several runs side by side, with each divided by the first."""

    head: list[str]
    rows: list[list[str]]
    ratios: dict[str, dict[str, float | None]]


def compare(runs: dict[str, Result], rows: Sequence[Row], base: str) -> Comparison:
    """Each run's figures of ``rows``, and each other run's over ``base``'s."""
    names = list(runs)
    others = [n for n in names if n != base]
    head = ["workload", "metric", *names, *(f"{n}/{base}" for n in others)]
    cells, out = [], {}
    for row in rows:
        values = {name: row.value(runs[name]) for name in names}
        ratio = {n: divide(values[n], values.get(base)) for n in others}
        out[f"{row.workload} {row.label}"] = {f"{n}/{base}": ratio[n] for n in others}
        numbers = [_number(values[n]) for n in names]
        cells.append([row.workload, row.label, *numbers, *map(_fixed, ratio.values())])
    return Comparison(head, cells, out)


def collector_comparison(results: Result) -> Comparison:
    """llmproxy-full with a healthy collector against the slow and the dead one."""
    runs = {COLLECTOR_BASE: results.get("targets", {}).get(COLLECTOR_BASE, {})}
    runs.update(results.get("collector", {}))
    return compare(runs, COLLECTOR_ROWS, COLLECTOR_BASE)


def dead_upstream_comparison(scenario: Result) -> Comparison:
    """The healthy route alone against the same beside a flood on the dead route."""
    runs = {
        "quiet": {"workloads": scenario.get("quiet", {})},
        "dead traffic": {"workloads": scenario.get("dead_traffic", {})},
    }
    return compare(runs, DEAD_UPSTREAM_ROWS, "quiet")


def full_report(results: Result) -> str:
    """Every table the run has figures for, in Markdown."""
    parts = ["## Overhead\n\n" + markdown(results.get("targets", {}))]
    if results.get("collector"):
        table = collector_comparison(results)
        parts.append("## Slow and dead trace collector\n\n" + _table(table))
        parts.append("\n".join(_notes(results["collector"])).strip())
    dead = results.get("dead_upstream")
    if dead is not None:
        parts.append("## Dead upstream beside a healthy one\n\n" + dead_upstream(dead))
    memory = results.get("memory")
    if memory is not None:
        full = results.get("targets", {}).get(COLLECTOR_BASE, {})
        parts.append("## Memory\n\n" + memory_table(memory, full))
    workers = results.get("workers")
    if workers:
        table = compare(workers, WORKERS_ROWS, WORKERS_BASE)
        parts.append("## One worker process against two, unpinned\n\n" + _table(table))
        parts.append("\n".join(_notes(workers)).strip())
    return "\n\n".join(part for part in parts if part)


def dead_upstream(scenario: Result) -> str:
    """The dead-upstream table and a line about the dead route's own load."""
    if scenario.get("status") != "ok":
        return f"skipped: {scenario.get('reason')}"
    text = _table(dead_upstream_comparison(scenario))
    load = scenario.get("dead_route") or {}
    state = {0.0: "closed", 1.0: "open", 2.0: "half-open"}
    breaker = state.get(scenario.get("dead_breaker_state") or -1.0, "unknown")
    return text + (
        f"\n\n/dead: {load.get('rate_per_s', 0):,.0f} requests/s over "
        f"{DEAD_CONNECTIONS_NOTE}, {load.get('errors', 0):,} of "
        f"{load.get('completed', 0):,} answered with an error (as they should); "
        f"breaker {breaker} at the end"
    )


DEAD_CONNECTIONS_NOTE = "16 connections, each pausing 20 ms between requests"


def memory_table(scenario: Result, full: Result) -> str:
    """Peak and resident memory of llmproxy-full at 64 and at N streams at once."""
    if scenario.get("status") != "ok":
        return f"skipped: {scenario.get('reason')}"
    streams = scenario["streams"]
    before = _mib(scenario.get("rss_before_kb"))
    rounds = scenario.get("rounds", [])
    head = ["figure", *(f"round {i + 1}" for i in range(len(rounds)))]
    rows = [_line(head), _line(["---"] * len(head))]
    previous = before
    growth, per_stream = [], []
    for result in rounds:
        after = _mib(result.get("rss_after_kb"))
        peak = _mib(result.get("peak_rss_kb"))
        growth.append(_number(_minus(after, previous)))
        over = _minus(peak, before)
        per_stream.append(_number(None if over is None else over * 1024 / streams))
        previous = after
    rows += [
        _line([f"streams completed (of {streams})", *_each(rounds, "completed")]),
        _line(["errors", *_each(rounds, "errors")]),
        _line(["cut streams", *_each(rounds, "incomplete")]),
        _line(["peak in flight", *_each(rounds, "peak_inflight")]),
        _line(["stream total p50 ms", *_each(rounds, "total_ms", "p50")]),
        _line(["stream total max ms", *_each(rounds, "total_ms", "max")]),
        _line(["peak RSS MiB", *_each(rounds, "peak_rss_kb", scale=MIB)]),
        _line(["RSS after MiB", *_each(rounds, "rss_after_kb", scale=MIB)]),
        _line(["RSS growth MiB (vs before the round)", *growth]),
        _line(["peak over RSS before, KiB per stream", *per_stream]),
    ]
    c64 = _mib(figure(full, "paced_c64", ("peak_rss_kb",)))
    return "\n".join(rows) + (
        f"\n\nllmproxy-full RSS before the rounds: {_number(before)} MiB; "
        f"peak during paced_c64 (64 paced streams): {_number(c64)} MiB"
    )


def _each(
    rounds: Sequence[Result], key: str, sub: str | None = None, scale: float = 1.0
) -> list[str]:
    cells = []
    for result in rounds:
        node = result.get(key)
        if sub is not None:
            node = node.get(sub) if isinstance(node, dict) else None
        value = float(node) * scale if isinstance(node, int | float) else None
        cells.append(_number(value))
    return cells


def _table(comparison: Comparison) -> str:
    head = comparison.head
    lines = [_line(head), _line(["---"] * len(head))]
    return "\n".join(lines + [_line(row) for row in comparison.rows])


def divide(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    return a / b if a is not None and b else None


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _mib(kib: object) -> float | None:
    return float(kib) * MIB if isinstance(kib, int | float) and kib else None


def _ratio(a: float | None, b: float | None) -> str:
    return _fixed(divide(a, b))


def _fixed(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
