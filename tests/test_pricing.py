"""Cost from the shipped price table: every rate, and the prefix match."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llmproxy.config import Price
from llmproxy.pricing import PriceTable


@dataclass
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    reasoning_tokens: int | None = None


SHIPPED = PriceTable.shipped()
M = 1_000_000


def test_uncached_and_cached_input() -> None:
    # gpt-4o: input $2.50, cached input $1.25, output $10 per million.
    usage = Usage(input_tokens=M, cached_input_tokens=400_000, output_tokens=M)
    cost = SHIPPED.cost("gpt-4o-2024-08-06", usage)
    assert cost == pytest.approx(600_000 * 2.5 / M + 400_000 * 1.25 / M + 10.0)


def test_cache_writes_at_their_own_rate() -> None:
    # claude-sonnet-4-5: input $3, cache read $0.30, cache write $3.75, output $15.
    # Input counts include cache reads and writes, as the dialect reports them.
    usage = Usage(
        input_tokens=5 + 100 + 20,
        cached_input_tokens=100,
        cache_creation_input_tokens=20,
        output_tokens=12,
    )
    cost = SHIPPED.cost("claude-sonnet-4-5-20250929", usage)
    assert cost == pytest.approx((5 * 3 + 100 * 0.30 + 20 * 3.75 + 12 * 15) / M)


def test_reasoning_rate_where_it_differs() -> None:
    table = PriceTable(
        {"r1": Price(input=1.0, output=2.0, cached_input=0.5, reasoning=8.0)}
    )
    usage = Usage(input_tokens=10, output_tokens=100, reasoning_tokens=60)
    assert table.cost("r1", usage) == pytest.approx((10 * 1 + 40 * 2 + 60 * 8) / M)


def test_missing_rates_fall_back() -> None:
    # No cached, cache-write or reasoning rate: input and output rates apply.
    table = PriceTable({"m": Price(input=1.0, output=2.0)})
    usage = Usage(
        input_tokens=30,
        cached_input_tokens=10,
        cache_creation_input_tokens=5,
        output_tokens=50,
        reasoning_tokens=20,
    )
    assert table.cost("m", usage) == pytest.approx((30 * 1 + 50 * 2) / M)


def test_reasoning_above_output_is_not_charged_twice() -> None:
    table = PriceTable({"m": Price(input=0.0, output=2.0, reasoning=4.0)})
    usage = Usage(output_tokens=10, reasoning_tokens=25)
    assert table.cost("m", usage) == pytest.approx(10 * 4 / M)


def test_o_series_reasoning_is_billed_as_output() -> None:
    usage = Usage(input_tokens=100, output_tokens=1000, reasoning_tokens=800)
    assert SHIPPED.cost("o3-mini-2025-01-31", usage) == pytest.approx(
        (100 * 1.10 + 1000 * 4.40) / M
    )


def test_prefix_match_longest_first_and_on_a_boundary() -> None:
    mini = SHIPPED.price("gpt-4o-mini")
    assert SHIPPED.price("gpt-4o-mini-2024-07-18") == mini
    assert SHIPPED.price("gpt-4o-2024-08-06") == SHIPPED.price("gpt-4o") != mini
    assert SHIPPED.price("gpt-4omni") is None  # not on a "-" boundary
    assert SHIPPED.price("claude-sonnet-4-20250514") == SHIPPED.price("claude-sonnet-4")


def test_unpriced_model_is_none_not_free() -> None:
    assert SHIPPED.cost("my-local-llama", Usage(input_tokens=5)) is None
    assert SHIPPED.cost(None, Usage(input_tokens=5)) is None


def test_overrides_replace_and_add() -> None:
    table = SHIPPED.merged(
        {"gpt-4o": Price(input=1.0, output=1.0), "local": Price(input=0, output=0)}
    )
    assert table.cost("gpt-4o", Usage(input_tokens=M, output_tokens=M)) == 2.0
    assert table.cost("local", Usage(input_tokens=M)) == 0.0
