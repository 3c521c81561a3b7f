"""Which headers cross the proxy, in each direction.

Hop-by-hop headers (RFC 9110 section 7.6.1) are connection-specific and never
forwarded, nor are headers the ``Connection`` header names. Credentials follow
one rule: if an upstream sets its own, the client's are dropped; otherwise the
client's pass through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CREDENTIALS = frozenset({"authorization", "x-api-key", "api-key"})
# Request headers whose values are secrets, or identify an account, in the form
# some SDK or gateway sends them: never written to logs, spans or captures.
SECRET_HEADERS = CREDENTIALS | {
    "proxy-authorization",
    "cookie",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "openai-organization",
    "openai-project",
    "x-amz-security-token",  # an AWS session token, sent beside a SigV4 signature
    "x-llmproxy-key",
}
_MIN_SECRET = 8  # shorter fragments are not worth hiding, and would mangle text
# Set again by the client library for the upstream connection and body.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
# The proxy reads a copy of every response, so it only offers codings it can read.
READABLE_CODINGS = ("gzip", "deflate")
_PROXY_HEADER_PREFIX = "x-llmproxy-"


def from_wire(names: list[bytes], values: list[bytes]) -> CIMultiDict[str]:
    """Header fields as the HTTP parser hands them over, for either direction:
    names are tokens (Latin-1 reads any byte), and values keep every byte
    (``surrogateescape``), so that a value forwarded is the value received."""
    return CIMultiDict(
        zip(
            [n.decode("latin-1") for n in names],
            [v.decode("utf-8", "surrogateescape") for v in values],
            strict=True,
        )
    )


def _connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    values = headers.getall("connection", [])
    return frozenset(
        t.strip().lower() for value in values for t in value.split(",") if t.strip()
    )


def upstream_request_headers(
    client: CIMultiDictProxy[str], injected: Mapping[str, str]
) -> CIMultiDict[str]:
    """Headers to send upstream: the client's, filtered, then the upstream's own."""
    drop = _REQUEST_DROP | _connection_listed(client)
    if injected and any(k.lower() in CREDENTIALS for k in injected):
        drop = drop | CREDENTIALS
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in client.items():
        lower = key.lower()
        if lower in drop or lower.startswith(_PROXY_HEADER_PREFIX):
            continue
        if lower == "accept-encoding":
            # Only what the proxy can read; never nothing, which would mean "any".
            value = _readable_codings(value) or "identity"
        out.add(key, value)
    for key, value in injected.items():
        out[key] = value
    return out


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to send the client: the upstream's, minus hop-by-hop ones."""
    # Copied whole, then pruned: the multidict does both in C, where a filtered
    # copy would lower-case every name in Python.
    drop = HOP_BY_HOP
    if "connection" in upstream:
        drop = drop | _connection_listed(upstream)
    out = CIMultiDict(upstream)
    for name in drop:
        if name in out:
            del out[name]  # every copy of it
    return out


def scrub_secrets(text: str, headers: Mapping[str, str]) -> str:
    """``text`` with every secret header value in ``headers`` replaced.

    For a provider's error message, which may quote the key it was sent: the
    whole value and each word of it (the token of ``Bearer <token>``) go.
    """
    items = headers.items()
    found = {
        part
        for key, value in items
        if key.lower() in SECRET_HEADERS
        for part in (value, *value.split())
        if len(part) >= _MIN_SECRET
    }
    for secret in sorted(found, key=len, reverse=True):
        text = text.replace(secret, "[REDACTED]")
    return text


def _readable_codings(value: str) -> str:
    """Keep only the content codings the proxy can decode, preserving q-values."""
    kept = []
    for item in value.split(","):
        coding = item.split(";", 1)[0].strip().lower()
        if coding in READABLE_CODINGS or coding == "identity":
            kept.append(item.strip())
    return ", ".join(kept)
