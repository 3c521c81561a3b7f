"""Answers that look wrong although the request succeeded, kind by kind."""

from __future__ import annotations

import pytest

from llmproxy.anomalies import anomalies
from llmproxy.exchange import Exchange


def answered(
    finish: str = "stop", text: str | None = "fine", operation: str = "chat"
) -> Exchange:
    ex = Exchange("t", "POST", "/v1/chat/completions")
    ex.operation, ex.status = operation, 200
    ex.finish_reasons = [finish]
    if text is not None:
        ex.output_seen = True
    return ex


def test_a_normal_answer_has_none() -> None:
    assert anomalies(answered()) == []


@pytest.mark.parametrize("finish", ["length", "max_tokens", "max_output_tokens"])
def test_truncated(finish: str) -> None:
    assert anomalies(answered(finish)) == ["truncated"]


def test_content_filter_by_finish_reason_or_error() -> None:
    assert anomalies(answered("content_filter")) == ["content_filter"]
    ex = answered(text=None)
    ex.error_type = "content_filter"
    # A filtered answer without content is not also "empty": the filter explains it.
    assert anomalies(ex) == ["content_filter"]


def test_refusal() -> None:
    ex = answered(text=None)
    ex.refusal = True
    assert anomalies(ex) == ["refusal"]
    assert anomalies(answered("refusal", text=None)) == ["refusal"]  # Anthropic


def test_empty() -> None:
    assert anomalies(answered(text=None)) == ["empty"]
    ex = answered("length", text=None)  # a reasoning model spent every token
    assert anomalies(ex) == ["truncated", "empty"]


def test_unreadable_answer_is_not_called_empty() -> None:
    ex = answered(text=None)
    ex.parse_failed("event_too_large", "SSE: event exceeds max_event_bytes")
    assert anomalies(ex) == []


def test_invalid_json_only_when_asked_for() -> None:
    ex = answered()
    ex.output_parts = ['{"a": ', "1"]
    assert anomalies(ex) == []
    ex.wants_json = True
    assert anomalies(ex) == ["invalid_json"]
    ex.output_parts.append("}")
    assert anomalies(ex) == []


def test_invalid_tool_arguments() -> None:
    ex = answered("tool_calls")
    ex.tool_args = {0: ['{"city": "Paris"}'], 1: ['{"city": ', '"Ro']}
    assert anomalies(ex) == ["invalid_tool_arguments"]
    ex.tool_args = {0: []}  # a call without arguments: "{}"
    assert anomalies(ex) == []


def test_capped_text_is_not_judged() -> None:
    ex = answered("tool_calls")
    ex.wants_json, ex.output_capped = True, True
    ex.output_parts, ex.tool_args = ['{"a": '], {0: ['{"b": ']}
    assert anomalies(ex) == []


@pytest.mark.parametrize(
    ("status", "error_type", "operation"),
    [
        (500, "upstream_5xx", "chat"),
        (200, "stream_truncated", "chat"),
        (200, None, "embeddings"),
        (200, None, None),
    ],
)
def test_failed_or_non_generative_exchanges_have_none(
    status: int, error_type: str | None, operation: str | None
) -> None:
    ex = answered("length", text=None)
    ex.status, ex.error_type, ex.operation = status, error_type, operation
    assert anomalies(ex) == []
