"""Provider failures mapped onto the closed vocabulary of error types."""

from __future__ import annotations

from typing import Any

import pytest

from llmproxy.classify import classify_error, classify_status


def openai_error(code: str | None, kind: str, message: str = "m") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def anthropic_error(kind: str, message: str = "m") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # auth
        (401, None, "auth"),
        (403, None, "auth"),
        (401, openai_error("invalid_api_key", "invalid_request_error"), "auth"),
        (401, openai_error(None, "invalid_request_error"), "auth"),
        (401, anthropic_error("authentication_error", "invalid x-api-key"), "auth"),
        (403, anthropic_error("permission_error"), "auth"),
        # context length
        (
            400,
            openai_error(
                "context_length_exceeded",
                "invalid_request_error",
                "This model's maximum context length is 8192 tokens.",
            ),
            "context_length",
        ),
        (
            400,
            anthropic_error(
                "invalid_request_error", "prompt is too long: 210000 tokens > 200000"
            ),
            "context_length",
        ),
        (  # vLLM: a generic type, only the message tells
            400,
            {
                "object": "error",
                "type": "BadRequestError",
                "message": "This model's maximum context length is 2048 tokens.",
                "code": 400,
            },
            "context_length",
        ),
        # content filter
        (
            400,
            openai_error("content_filter", "invalid_request_error"),
            "content_filter",
        ),
        (
            400,
            openai_error("content_policy_violation", "invalid_request_error"),
            "content_filter",
        ),
        # the rest of the vocabulary, for contrast
        (429, openai_error("rate_limit_exceeded", "requests"), "rate_limited"),
        (429, openai_error("insufficient_quota", "insufficient_quota"), "rate_limited"),
        (529, anthropic_error("overloaded_error"), "overloaded"),
        (400, anthropic_error("invalid_request_error", "bad field"), "upstream_4xx"),
        (404, openai_error("model_not_found", "invalid_request_error"), "upstream_4xx"),
        (500, anthropic_error("api_error"), "upstream_5xx"),
        (503, {"detail": "unavailable"}, "upstream_5xx"),
        (200, None, None),
    ],
)
def test_classify_status(status: int, body: Any, expected: str | None) -> None:
    assert classify_status(status, body) == expected


def test_a_specific_type_beats_a_message_hint() -> None:
    body = anthropic_error("rate_limit_error", "too many tokens per minute")
    assert classify_error(body) == "rate_limited"


def test_stream_error_events_are_classified() -> None:
    # An Anthropic stream's error event, and a Responses API stream's.
    assert classify_error(anthropic_error("overloaded_error")) == "overloaded"
    responses = {"type": "error", "code": "server_error", "message": "boom"}
    assert classify_error(responses) == "upstream_5xx"
    assert classify_error({"type": "error", "code": "invalid_api_key"}) == "auth"


@pytest.mark.parametrize("error", [None, "text", 42, [], {"error": "a string"}])
def test_unreadable_error_objects_are_upstream_5xx(error: Any) -> None:
    assert classify_error(error) == "upstream_5xx"
