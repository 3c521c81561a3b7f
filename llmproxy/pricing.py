"""Prices: what an exchange cost, from the shipped table and the config's overrides.

``PriceTable.cost`` returns ``None`` for a model it has no price for, so the
caller can count it as unpriced instead of silently as free.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any, Protocol

import yaml

from .config import Price

_PER_TOKEN = 1e-6  # rates are USD per million tokens


class Usage(Protocol):
    """Token counts, as an ``Exchange`` or a cached ``Entry`` holds them."""

    @property
    def input_tokens(self) -> int | None: ...
    @property
    def output_tokens(self) -> int | None: ...
    @property
    def cached_input_tokens(self) -> int | None: ...
    @property
    def cache_creation_input_tokens(self) -> int | None: ...
    @property
    def reasoning_tokens(self) -> int | None: ...


class PriceTable:
    """Model name (exact, or a prefix on a ``-`` boundary) to ``Price``."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)
        # Longest first, so "gpt-4o-mini" wins over "gpt-4o" for its dated names.
        self._prefixes = sorted(self._prices, key=len, reverse=True)
        self._resolved: dict[str, Price | None] = {}

    @classmethod
    def shipped(cls) -> PriceTable:
        """The table in ``llmproxy/data/pricing.yaml``."""
        text = resources.files("llmproxy").joinpath("data/pricing.yaml").read_text()
        raw: dict[str, dict[str, Any]] = yaml.safe_load(text)
        return cls({model: Price(**rates) for model, rates in raw.items()})

    def merged(self, overrides: Mapping[str, Price]) -> PriceTable:
        """A table where ``overrides`` replace or add entries."""
        return PriceTable({**self._prices, **overrides})

    def price(self, model: str | None) -> Price | None:
        if not model:
            return None
        if model in self._resolved:
            return self._resolved[model]
        found = self._prices.get(model)
        if found is None:
            for prefix in self._prefixes:
                if model.startswith(prefix) and model[len(prefix)] in "-@:":
                    found = self._prices[prefix]
                    break
        if len(self._resolved) < 10_000:  # bounded: model names come from clients
            self._resolved[model] = found
        return found

    def cost(self, model: str | None, ex: Usage) -> float | None:
        """USD for the exchange's usage, or ``None`` when the model has no price."""
        price = self.price(model)
        if price is None:
            return None
        cached = ex.cached_input_tokens or 0
        written = ex.cache_creation_input_tokens or 0
        # Input counts include cache reads and writes (as the semconv asks), so
        # the uncached part is what remains.
        uncached = max((ex.input_tokens or 0) - cached - written, 0)
        output = ex.output_tokens or 0
        reasoning = min(ex.reasoning_tokens or 0, output)
        usd = (
            uncached * price.input
            + cached * _or(price.cached_input, price.input)
            + written * _or(price.cache_creation_input, price.input)
            + (output - reasoning) * price.output
            + reasoning * _or(price.reasoning, price.output)
        )
        return usd * _PER_TOKEN


def _or(rate: float | None, default: float) -> float:
    return default if rate is None else rate
