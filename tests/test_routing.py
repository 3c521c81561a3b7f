"""Routing: longest prefix on whole segments, model fan-out, the upstream path."""

from __future__ import annotations

from typing import Any

import pytest

from llmproxy.config import Route, build_config
from llmproxy.routing import Router, upstream_path

UPSTREAMS = {
    name: {"url": f"https://{name}.example"}
    for name in ("openai", "anthropic", "azure", "local", "catchall", "chat")
}


def routes(*specs: dict[str, Any]) -> tuple[Route, ...]:
    return build_config({"upstreams": UPSTREAMS, "routes": list(specs)}).routes


def router(*specs: dict[str, Any]) -> Router:
    return Router(routes(*specs))


def route_for(r: Router, path: str, model: str | None = None) -> str | None:
    """The name of the route chosen for ``path`` and ``model``, or None."""
    chosen = r.choose(r.candidates(path), model)
    return None if chosen is None else chosen.name


# --- prefixes ------------------------------------------------------------------


def test_longest_prefix_wins_whatever_the_order() -> None:
    specs = [
        {"prefix": "/v1", "upstream": "openai"},
        {"prefix": "/v1/chat", "upstream": "chat"},
        {"prefix": "/v1/chat/completions", "upstream": "local"},
    ]
    for ordering in (specs, specs[::-1], [specs[1], specs[2], specs[0]]):
        r = router(*ordering)

        assert route_for(r, "/v1/chat/completions") == "/v1/chat/completions"
        assert route_for(r, "/v1/chat/other") == "/v1/chat"
        assert route_for(r, "/v1/embeddings") == "/v1"


def test_candidates_are_longest_first() -> None:
    r = router(
        {"prefix": "/", "upstream": "catchall"},
        {"prefix": "/v1", "upstream": "openai"},
        {"prefix": "/v1/chat", "upstream": "chat"},
    )

    assert [c.name for c in r.candidates("/v1/chat/completions")] == [
        "/v1/chat",
        "/v1",
        "/",
    ]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1", "/v1"),
        ("/v1/", "/v1"),
        ("/v1/chat/completions", "/v1"),
        ("/v10", None),
        ("/v10/chat", None),
        ("/v1x", None),
        ("/v", None),
        ("/", None),
        ("", None),
        ("v1/chat", None),
        ("/V1/chat", None),
        ("/anthropic/v1/messages", "/anthropic"),
        ("/anthropicx/v1/messages", None),
    ],
)
def test_prefix_matches_whole_segments_only(path: str, expected: str | None) -> None:
    r = router(
        {"prefix": "/v1", "upstream": "openai"},
        {"prefix": "/anthropic", "upstream": "anthropic"},
    )

    assert route_for(r, path) == expected


def test_prefix_configured_with_trailing_slash_still_matches_segments() -> None:
    r = router({"prefix": "/v1/", "upstream": "openai"})

    assert route_for(r, "/v1") == "/v1"
    assert route_for(r, "/v1/models") == "/v1"
    assert route_for(r, "/v10") is None


def test_root_prefix_catches_everything_else() -> None:
    r = router(
        {"prefix": "/", "upstream": "catchall"},
        {"prefix": "/v1", "upstream": "openai"},
    )

    assert route_for(r, "/") == "/"
    assert route_for(r, "/v10") == "/"
    assert route_for(r, "/healthz") == "/"
    assert route_for(r, "/v1/models") == "/v1"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../admin",
        "/v1/./models",
        "/v1/..",
        "/v1/.",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2E/admin",
        "/v1/%2e/models",
        "/v1/.%2e/admin",
        "/v1/%2e./admin",
        "/v1/chat/%2E%2e",
        "/..",
        "/./v1",
    ],
)
def test_dot_segments_match_nothing(path: str) -> None:
    r = router(
        {"prefix": "/", "upstream": "catchall"},
        {"prefix": "/v1", "upstream": "openai"},
    )

    assert r.candidates(path) == []
    assert route_for(r, path) is None


@pytest.mark.parametrize(
    "path", ["/v1/file.json", "/v1/..hidden", "/v1/a..b", "/v1/.x"]
)
def test_dots_inside_a_segment_are_not_dot_segments(path: str) -> None:
    r = router({"prefix": "/v1", "upstream": "openai"})

    assert route_for(r, path) == "/v1"


def test_no_routes_no_candidates() -> None:
    assert Router([]).candidates("/v1") == []
    assert Router.choose([], "gpt-4o") is None


# --- model fan-out -------------------------------------------------------------

FAN_OUT = [
    {"prefix": "/v1", "upstream": "openai"},
    {"prefix": "/v1", "upstream": "local", "models": ["meta-llama/*", "Qwen/*"]},
    {"prefix": "/v1", "upstream": "azure", "models": ["gpt-4*"]},
]


def test_routes_sharing_a_prefix_are_named_prefix_colon_upstream() -> None:
    names = [r.name for r in routes(*FAN_OUT)]

    assert names == ["/v1:openai", "/v1:local", "/v1:azure"]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "/v1:azure"),
        ("gpt-4", "/v1:azure"),
        ("gpt-4-turbo-2024", "/v1:azure"),
        ("gpt-3.5-turbo", "/v1:openai"),
        ("GPT-4o", "/v1:openai"),  # patterns are case-sensitive
        ("meta-llama/Llama-3-8B", "/v1:local"),
        ("Qwen/Qwen2-7B", "/v1:local"),
        ("qwen/Qwen2-7B", "/v1:openai"),
        ("o1", "/v1:openai"),
        ("", "/v1:openai"),
        (None, "/v1:openai"),
    ],
)
def test_model_fans_out_with_catch_all_last(model: str | None, expected: str) -> None:
    # The catch-all is listed first, yet the pattern routes are tried before it.
    r = router(*FAN_OUT)

    assert route_for(r, "/v1/chat/completions", model) == expected


@pytest.mark.parametrize("model", ["gpt-3.5-turbo", "claude-3", "", None])
def test_model_matching_no_pattern_without_catch_all_gets_none(
    model: str | None,
) -> None:
    r = router(*FAN_OUT[1:])

    assert len(r.candidates("/v1/chat/completions")) == 2
    assert route_for(r, "/v1/chat/completions", model) is None


def test_shell_pattern_features() -> None:
    r = router(
        {"prefix": "/v1", "upstream": "openai", "models": ["o[13]-mini", "gpt-?o"]},
        {"prefix": "/v1", "upstream": "local", "models": ["*"]},
    )

    assert route_for(r, "/v1/x", "o1-mini") == "/v1:openai"
    assert route_for(r, "/v1/x", "o3-mini") == "/v1:openai"
    assert route_for(r, "/v1/x", "o2-mini") == "/v1:local"
    assert route_for(r, "/v1/x", "gpt-4o") == "/v1:openai"
    assert route_for(r, "/v1/x", "gpt-40o") == "/v1:local"
    # "*" takes every model, but a request without one goes nowhere.
    assert route_for(r, "/v1/x", None) is None


def test_pattern_routes_keep_their_configured_order() -> None:
    r = router(
        {"prefix": "/v1", "upstream": "azure", "models": ["gpt-4o*"]},
        {"prefix": "/v1", "upstream": "openai", "models": ["gpt-4*"]},
    )

    assert route_for(r, "/v1/x", "gpt-4o-mini") == "/v1:azure"
    assert route_for(r, "/v1/x", "gpt-4-turbo") == "/v1:openai"


def test_unclaimed_model_falls_back_to_a_shorter_prefix() -> None:
    r = router(
        {"prefix": "/v1/chat", "upstream": "local", "models": ["llama*"]},
        {"prefix": "/v1", "upstream": "openai"},
    )

    assert route_for(r, "/v1/chat/completions", "llama-3") == "/v1/chat"
    assert route_for(r, "/v1/chat/completions", "gpt-4o") == "/v1"


# --- the path sent upstream ----------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "strip", "path", "expected"),
    [
        ("/anthropic", True, "/anthropic/v1/messages", "/v1/messages"),
        ("/anthropic", True, "/anthropic", "/"),
        ("/anthropic", True, "/anthropic/", "/"),
        ("/anthropic/", True, "/anthropic/v1/messages", "/v1/messages"),
        ("/a/b", True, "/a/b/c/d", "/c/d"),
        ("/anthropic", False, "/anthropic/v1/messages", "/anthropic/v1/messages"),
        ("/v1", False, "/v1/chat/completions", "/v1/chat/completions"),
        ("/", True, "/v1/models", "/v1/models"),
        ("/", False, "/v1/models", "/v1/models"),
    ],
)
def test_upstream_path(prefix: str, strip: bool, path: str, expected: str) -> None:
    [route] = routes({"prefix": prefix, "upstream": "openai", "strip_prefix": strip})

    assert upstream_path(route, path) == expected
