"""Settling a finished record: the work that waited for the request to end.

The prompt's fingerprint and size are computed here rather than on the request
path, and then token estimates for answers whose usage the provider did not
report.

Used only when a successful generative exchange ended without usage (an
OpenAI-compatible server that ignores ``stream_options``, or injection turned
off). Estimates are marked ``usage_source="estimated"`` wherever they appear,
and such responses also count in ``llmproxy_usage_missing_total``.
"""

from __future__ import annotations

from .dialects import settle_request
from .exchange import Exchange
from .headers import scrub_secrets

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE tokenizers
_GENERATIVE = frozenset({"chat", "text_completion"})
# Events of an OpenAI-dialect stream that carry no output: role, finish, [DONE].
_FRAMING_EVENTS = 3


def settle(ex: Exchange) -> None:
    """The first sink: finish the record so every later sink sees the same one."""
    settle_request(ex)
    estimate_usage(ex)
    if ex.error_message and ex.request_headers:
        # A provider's error message may quote the credentials it was sent.
        ex.error_message = scrub_secrets(ex.error_message, ex.request_headers)


def estimate_usage(ex: Exchange) -> None:
    """Fill in estimated token counts where the provider reported none."""
    if (
        ex.usage_source is not None
        or ex.operation not in _GENERATIVE
        or ex.status >= 400
        or not ex.attempts
    ):
        return
    if ex.output_parts:
        output = -(-sum(len(p) for p in ex.output_parts) // CHARS_PER_TOKEN)
    elif ex.events:
        # OpenAI-dialect servers send about one token per content event.
        output = max(ex.events - _FRAMING_EVENTS, 0)
    else:
        return
    ex.output_tokens = output
    ex.input_tokens = -(-ex.prompt_chars // CHARS_PER_TOKEN)
    ex.usage_source = "estimated"
