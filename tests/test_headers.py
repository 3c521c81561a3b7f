"""Which headers cross the proxy, in each direction."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from llmproxy.headers import client_response_headers, upstream_request_headers

HOP_BY_HOP = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "h2c"),
    ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("Proxy-Authenticate", "Basic"),
]


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def request(
    *pairs: tuple[str, str], injected: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    return list(upstream_request_headers(headers(*pairs), injected or {}).items())


def response(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    return list(client_response_headers(headers(*pairs)).items())


# --- hop-by-hop ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP)
def test_hop_by_hop_dropped_on_requests(name: str, value: str) -> None:
    sent = request((name, value), ("Content-Type", "application/json"))

    assert sent == [("Content-Type", "application/json")]


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP)
def test_hop_by_hop_dropped_on_responses(name: str, value: str) -> None:
    sent = response((name, value), ("Content-Type", "text/event-stream"))

    assert sent == [("Content-Type", "text/event-stream")]


def test_hop_by_hop_dropped_whatever_the_case() -> None:
    sent = request(
        ("CONNECTION", "close"), ("transfer-ENCODING", "chunked"), ("x-ok", "1")
    )

    assert sent == [("x-ok", "1")]


def test_headers_named_in_connection_dropped_on_requests() -> None:
    sent = request(
        ("Connection", "keep-alive, X-Hop ,  x-other"),
        ("X-Hop", "1"),
        ("X-Other", "2"),
        ("X-Kept", "3"),
    )

    assert sent == [("X-Kept", "3")]


def test_headers_named_in_connection_dropped_on_responses() -> None:
    sent = response(
        ("Connection", "X-Upstream-Hop"),
        ("x-upstream-hop", "1"),
        ("Content-Length", "12"),
        ("x-request-id", "req_1"),
    )

    assert sent == [("Content-Length", "12"), ("x-request-id", "req_1")]


def test_headers_named_in_any_connection_line_dropped() -> None:
    sent = request(
        ("Connection", "keep-alive"), ("Connection", "X-Hop"), ("X-Hop", "1")
    )

    assert sent == []


def test_empty_connection_header_drops_only_itself() -> None:
    assert request(("Connection", ""), ("X-A", "1")) == [("X-A", "1")]


# --- request-only drops --------------------------------------------------------


def test_host_content_length_and_expect_dropped_on_requests() -> None:
    sent = request(
        ("Host", "llmproxy:8080"),
        ("Content-Length", "42"),
        ("Expect", "100-continue"),
        ("Content-Type", "application/json"),
        ("User-Agent", "OpenAI/Python 1.40.0"),
    )

    assert sent == [
        ("Content-Type", "application/json"),
        ("User-Agent", "OpenAI/Python 1.40.0"),
    ]


def test_content_length_kept_on_responses() -> None:
    assert response(("Content-Length", "2"), ("Content-Type", "application/json")) == [
        ("Content-Length", "2"),
        ("Content-Type", "application/json"),
    ]


@pytest.mark.parametrize(
    "name", ["x-llmproxy-tenant", "X-LLMProxy-Prompt-Version", "x-llmproxy-anything"]
)
def test_proxy_headers_not_forwarded(name: str) -> None:
    sent = request((name, "acme"), ("x-llmproxy", "kept"), ("x-llm-proxy-a", "kept"))

    assert sent == [("x-llmproxy", "kept"), ("x-llm-proxy-a", "kept")]


def test_order_repeats_and_case_of_other_headers_are_kept() -> None:
    pairs = [
        ("Accept", "text/event-stream"),
        ("X-Stainless-Lang", "python"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("X-Multi", "1"),
        ("x-multi", "2"),
        ("anthropic-version", "2023-06-01"),
    ]

    assert request(*pairs) == pairs


# --- credentials ---------------------------------------------------------------

CLIENT_CREDENTIALS = [
    ("Authorization", "Bearer sk-client"),
    ("x-api-key", "sk-ant-client"),
    ("api-key", "azure-client"),
]


def test_credentials_pass_through_when_upstream_injects_none() -> None:
    sent = request(*CLIENT_CREDENTIALS, ("Content-Type", "application/json"))

    assert sent == [*CLIENT_CREDENTIALS, ("Content-Type", "application/json")]


def test_credentials_pass_through_beside_non_credential_injected_headers() -> None:
    sent = request(*CLIENT_CREDENTIALS, injected={"OpenAI-Organization": "org-1"})

    assert sent == [*CLIENT_CREDENTIALS, ("OpenAI-Organization", "org-1")]


@pytest.mark.parametrize(
    "injected",
    [
        {"Authorization": "Bearer sk-upstream"},
        {"authorization": "Bearer sk-upstream"},
        {"x-api-key": "sk-ant-upstream"},
        {"X-Api-Key": "sk-ant-upstream"},
        {"api-key": "azure-upstream"},
        {"Api-Key": "azure-upstream", "OpenAI-Organization": "org-1"},
    ],
)
def test_all_client_credentials_dropped_when_upstream_injects_one(
    injected: dict[str, str],
) -> None:
    sent = request(
        *CLIENT_CREDENTIALS,
        ("AUTHORIZATION", "Bearer second"),
        ("Content-Type", "application/json"),
        injected=injected,
    )

    assert sent == [("Content-Type", "application/json"), *injected.items()]
    sent_values = [value for _, value in sent]
    assert not any("client" in v or v == "Bearer second" for v in sent_values)


def test_injected_header_replaces_client_header_of_same_name() -> None:
    out = upstream_request_headers(
        headers(
            ("OpenAI-Organization", "org-client"),
            ("openai-organization", "org-client-2"),
            ("X-A", "1"),
        ),
        {"OpenAI-Organization": "org-upstream"},
    )

    assert out.getall("OpenAI-Organization") == ["org-upstream"]
    assert dict(out) == {"OpenAI-Organization": "org-upstream", "X-A": "1"}


def test_injected_credentials_are_not_duplicated() -> None:
    out = upstream_request_headers(
        headers(("Authorization", "Bearer sk-client")),
        {"Authorization": "Bearer sk-upstream"},
    )

    assert out.getall("Authorization") == ["Bearer sk-upstream"]


# --- Accept-Encoding -----------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "sent"),
    [
        ("gzip, deflate, br, zstd", "gzip, deflate"),
        ("gzip;q=1.0, br;q=0.9, deflate;q=0.5", "gzip;q=1.0, deflate;q=0.5"),
        ("br;q=1.0, identity;q=0.5, *;q=0", "identity;q=0.5"),
        ("GZIP", "GZIP"),
        ("identity", "identity"),
        ("  gzip ;q=0.8 ,br", "gzip ;q=0.8"),
        ("deflate", "deflate"),
    ],
)
def test_accept_encoding_narrowed_to_readable_codings(offered: str, sent: str) -> None:
    out = request(("Accept-Encoding", offered), ("X-A", "1"))

    assert out == [("Accept-Encoding", sent), ("X-A", "1")]


@pytest.mark.parametrize("offered", ["br, zstd", "br", "*", "", "compress, x-gzip"])
def test_accept_encoding_is_identity_when_nothing_readable_remains(
    offered: str,
) -> None:
    # An absent header would mean "any coding", which the proxy might not read.
    assert request(("Accept-Encoding", offered), ("X-A", "1")) == [
        ("Accept-Encoding", "identity"),
        ("X-A", "1"),
    ]


def test_accept_encoding_passes_through_on_responses_untouched() -> None:
    assert response(("Content-Encoding", "br"), ("Vary", "Accept-Encoding")) == [
        ("Content-Encoding", "br"),
        ("Vary", "Accept-Encoding"),
    ]


def test_inputs_are_not_modified() -> None:
    pairs = [("Connection", "X-Hop"), ("X-Hop", "1"), ("Host", "h")]
    client = CIMultiDict(pairs)
    proxy = CIMultiDictProxy(client)

    upstream_request_headers(proxy, {"Authorization": "Bearer x"})
    client_response_headers(proxy)

    assert list(client.items()) == pairs
