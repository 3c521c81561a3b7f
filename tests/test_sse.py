"""The SSE reader, against the HTML standard's event-stream parsing rules."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy import sse
from llmproxy.sse import DEFAULT_MAX_EVENT_BYTES, Event, SSEReader

PROPERTY = settings(max_examples=200, deadline=None)


def parse(
    chunks: Iterable[bytes], max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> list[Event]:
    """Every event of a whole stream, fed chunk by chunk, then closed."""
    reader = SSEReader(max_event_bytes)
    events: list[Event] = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
    events.extend(reader.close())
    return events


# --- line endings --------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_each_line_ending(eol: bytes) -> None:
    stream = eol.join([b"data: one", b"", b"event: ping", b"data: two", b"", b""])

    assert parse([stream]) == [("message", b"one"), ("ping", b"two")]


def test_events_returned_by_the_feed_that_completes_them() -> None:
    reader = SSEReader()

    assert reader.feed(b"data: a\n") == []
    assert reader.feed(b"\ndata: b\n") == [("message", b"a")]
    assert reader.feed(b"\n") == [("message", b"b")]
    assert reader.close() == []


def test_mixed_line_endings_in_one_stream() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\nevent: e\rdata: d\r\r\n"

    assert parse([stream]) == [("message", b"a\nb\nc"), ("e", b"d")]


def test_crlf_split_across_two_chunks_is_one_line_ending() -> None:
    reader = SSEReader()

    # Were \r and \n two line endings, the empty line between them would
    # dispatch "a" on its own.
    assert reader.feed(b"data: a\r") == []
    assert reader.feed(b"\ndata: b\r") == []
    assert reader.feed(b"\n\r") == []
    assert reader.feed(b"\n") == [("message", b"a\nb")]


def test_cr_at_chunk_end_followed_by_other_byte_ends_the_line() -> None:
    reader = SSEReader()

    assert reader.feed(b"data: a\r") == []
    assert reader.feed(b"data: b\r") == []
    assert reader.feed(b"\rdata: c\n\n") == [("message", b"a\nb"), ("message", b"c")]


def test_chunk_of_a_single_cr() -> None:
    reader = SSEReader()
    events: list[Event] = []

    for chunk in (b"data: a", b"\r", b"\r", b"\r", b"data: b", b"\r", b"\r"):
        events.extend(reader.feed(chunk))
    events.extend(reader.close())

    assert events == [("message", b"a"), ("message", b"b")]


def test_cr_then_lf_in_the_same_chunk_after_a_split() -> None:
    assert parse([b"data: a\r", b"\n", b"\r\n"]) == [("message", b"a")]


# --- fields --------------------------------------------------------------------


def test_comment_lines_are_ignored() -> None:
    stream = b": ping\n:\ndata: a\n: inside an event\ndata: b\n\n: trailing\n\n"

    assert parse([stream]) == [("message", b"a\nb")]


def test_unnamed_event_is_message() -> None:
    assert parse([b"data: {}\n\n"]) == [("message", b"{}")]


def test_named_event() -> None:
    stream = b'event: message_start\ndata: {"a":1}\n\n'

    assert parse([stream]) == [("message_start", b'{"a":1}')]


def test_event_name_does_not_carry_over_to_the_next_event() -> None:
    stream = b"event: delta\ndata: 1\n\ndata: 2\n\n"

    assert parse([stream]) == [("delta", b"1"), ("message", b"2")]


def test_last_event_field_wins() -> None:
    assert parse([b"event: a\nevent: b\ndata: x\n\n"]) == [("b", b"x")]


def test_empty_event_name_is_message() -> None:
    assert parse([b"event:\ndata: x\n\nevent: \ndata: y\n\n"]) == [
        ("message", b"x"),
        ("message", b"y"),
    ]


def test_multi_line_data_joined_with_lf() -> None:
    stream = b"data: first\ndata:\ndata: third\n\n"

    assert parse([stream]) == [("message", b"first\n\nthird")]


def test_only_one_space_after_the_colon_is_dropped() -> None:
    stream = b"data:x\n\ndata:  two spaces\n\ndata:\tx\n\n"

    assert parse([stream]) == [
        ("message", b"x"),
        ("message", b" two spaces"),
        ("message", b"\tx"),
    ]


def test_value_may_hold_colons() -> None:
    assert parse([b"data: a: b:c\n\n"]) == [("message", b"a: b:c")]


def test_field_without_colon_has_an_empty_value() -> None:
    # "data" alone appends an empty line; the event is still dispatched.
    assert parse([b"data\n\n"]) == [("message", b"")]
    assert parse([b"data\ndata\n\n"]) == [("message", b"\n")]
    assert parse([b"event\ndata: x\n\n"]) == [("message", b"x")]


def test_unknown_fields_id_and_retry_are_ignored() -> None:
    stream = b"id: 7\nretry: 1000\nfoo: bar\ndata : no\nDATA: no\ndata: yes\n\n"

    assert parse([stream]) == [("message", b"yes")]


def test_id_or_retry_alone_dispatch_nothing() -> None:
    assert parse([b"id: 1\n\nretry: 5\n\n"]) == []


def test_blank_line_without_data_dispatches_nothing() -> None:
    stream = b"\n\n\nevent: lonely\n\n\ndata: x\n\n"

    # The name of an event without data is forgotten, as the standard says.
    assert parse([stream]) == [("message", b"x")]


def test_name_that_is_not_utf8_is_replaced() -> None:
    assert parse([b"event: a\xffb\ndata: x\n\n"]) == [("a\ufffdb", b"x")]


def test_data_bytes_are_kept_as_they_are() -> None:
    assert parse([b"data: \xff\x00\xc3\xa9\n\n"]) == [("message", b"\xff\x00\xc3\xa9")]


def test_leading_byte_order_mark_is_skipped() -> None:
    assert parse([b"\xef\xbb\xbfdata: a\n\n"]) == [("message", b"a")]


# --- end of stream -------------------------------------------------------------


def test_close_dispatches_an_event_ended_by_a_final_cr() -> None:
    reader = SSEReader()

    # The last \r might still be followed by \n, so only close() can tell.
    assert reader.feed(b"data: a\r\r") == []
    assert reader.close() == [("message", b"a")]


def test_close_dispatches_event_whose_final_cr_came_alone() -> None:
    reader = SSEReader()

    assert reader.feed(b"data: a\r") == []
    assert reader.feed(b"\r") == []
    assert reader.close() == [("message", b"a")]


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"data: a\n", []),
        (b"data: a", []),
        (b"data: a\r", []),
        (b"data: a\r\n", []),
        (b"data: a\n\ndata: b\n", [("message", b"a")]),
        (b"data: a\n\ndata: b", [("message", b"a")]),
    ],
)
def test_close_does_not_dispatch_an_unterminated_event(
    stream: bytes, expected: list[Event]
) -> None:
    assert parse([stream]) == expected


def test_close_twice_and_on_an_empty_stream() -> None:
    reader = SSEReader()

    assert reader.close() == []
    assert reader.feed(b"") == []
    assert reader.close() == []


# --- the bound -----------------------------------------------------------------


def test_endless_line_fails_and_buffers_nothing() -> None:
    reader = SSEReader(max_event_bytes=1000)
    piece = b"x" * 100

    assert reader.feed(b"data: ") == []
    for _ in range(50):
        assert reader.feed(piece) == []
        assert len(reader._buf) <= 1000
    assert reader.failed == "event exceeds max_event_bytes"
    assert reader._buf == b""

    # Nothing more comes out, and nothing more is held.
    assert reader.feed(b"\n\ndata: later\n\n") == []
    assert reader._buf == b""
    assert reader.close() == []


def test_event_of_many_lines_beyond_the_bound_fails() -> None:
    reader = SSEReader(max_event_bytes=1000)

    for _ in range(30):
        assert reader.feed(b"data: " + b"y" * 50 + b"\n") == []
    assert reader.failed is not None
    assert reader.feed(b"\n") == []
    assert reader.close() == []


def test_event_within_the_bound_is_fine() -> None:
    reader = SSEReader(max_event_bytes=1000)
    data = b"z" * 900

    events = reader.feed(b"data: " + data[:450]) + reader.feed(data[450:] + b"\n\n")

    assert events == [("message", data)]
    assert reader.failed is None


def test_many_small_events_never_hit_the_bound() -> None:
    reader = SSEReader(max_event_bytes=64)
    events: list[Event] = []

    for i in range(1000):
        events.extend(reader.feed(b"data: %d\n\n" % i))

    assert reader.failed is None
    assert [int(data) for _, data in events] == list(range(1000))


def test_endless_comment_line_fails_too() -> None:
    reader = SSEReader(max_event_bytes=100)

    for _ in range(20):
        reader.feed(b":" + b"c" * 20)

    assert reader.failed is not None
    assert reader._buf == b""


# --- properties ----------------------------------------------------------------

_line_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=12,
)
_events = st.lists(
    st.tuples(
        st.one_of(st.none(), _line_text), st.lists(_line_text, min_size=1, max_size=4)
    ),
    max_size=6,
)
_eols = st.sampled_from([b"\n", b"\r\n", b"\r"])


def serialize(
    events: list[tuple[str | None, list[str]]], eol: bytes, comments: bool
) -> bytes:
    lines: list[bytes] = []
    for name, data in events:
        if comments:
            lines.append(b": keep-alive")
        if name is not None:
            lines.append(b"event: " + name.encode())
        lines.extend(b"data: " + line.encode() for line in data)
        if comments:
            lines.append(b"id: 42")
        lines.append(b"")
    return b"".join(line + eol for line in lines)


def split_at(blob: bytes, data: st.DataObject) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=24)))
    bounds = [0, *cuts, len(blob)]
    return [blob[a:b] for a, b in pairwise(bounds)]


@PROPERTY
@given(events=_events, eol=_eols, comments=st.booleans(), data=st.data())
def test_split_stream_parses_like_whole_and_like_the_original(
    events: list[tuple[str | None, list[str]]],
    eol: bytes,
    comments: bool,
    data: st.DataObject,
) -> None:
    blob = serialize(events, eol, comments)
    chunks = split_at(blob, data)

    whole = parse([blob])
    split = parse(chunks)

    assert b"".join(chunks) == blob
    assert split == whole
    assert whole == [
        (name or "message", "\n".join(lines).encode()) for name, lines in events
    ]


@PROPERTY
@given(events=_events, eol=_eols, data=st.data())
def test_events_come_out_no_later_than_the_chunk_after_their_end(
    events: list[tuple[str | None, list[str]]], eol: bytes, data: st.DataObject
) -> None:
    blob = serialize(events, eol, comments=False)
    chunks = split_at(blob, data)
    reader = SSEReader()

    fed: list[Event] = []
    for chunk in chunks:
        fed.extend(reader.feed(chunk))
    closed = reader.close()

    # Only a final CR (which could still be followed by LF) waits for close().
    assert len(closed) <= 1
    if eol != b"\r":
        assert closed == []
    assert len(fed) + len(closed) == len(events)


_sse_ish = st.lists(
    st.sampled_from(
        [
            b"data:",
            b"data: ",
            b"event: ",
            b"id: 1",
            b"retry",
            b":",
            b" ",
            b"x",
            b"{}",
            b"\r",
            b"\n",
            b"\r\n",
            b"\xff",
            b"\xef\xbb\xbf",
            b"",
        ]
    ),
    max_size=60,
).map(b"".join)
_any_bytes = st.one_of(st.binary(max_size=400), _sse_ish)


@PROPERTY
@given(blob=_any_bytes, data=st.data())
def test_arbitrary_bytes_split_anywhere_parse_like_whole(
    blob: bytes, data: st.DataObject
) -> None:
    chunks = split_at(blob, data)

    split = parse(chunks)
    whole = parse([blob])

    assert split == whole
    assert all(isinstance(n, str) and isinstance(d, bytes) for n, d in split)


@PROPERTY
@given(blob=_any_bytes, data=st.data())
def test_the_fast_path_for_whole_events_reads_as_line_by_line(
    blob: bytes, data: st.DataObject
) -> None:
    chunks = split_at(blob, data)
    fast = parse(chunks)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sse, "_whole_events", lambda buf, events: 0)
        slow = parse(chunks)
    assert fast == slow


def test_the_fast_path_hands_over_mid_event() -> None:
    reader = SSEReader()
    # Two whole events, then one with a second field, then one cut short.
    events = reader.feed(b"data: a\n\ndata: b\n\ndata: c\nid: 7\n\ndata: d")
    assert events == [("message", b"a"), ("message", b"b"), ("message", b"c")]
    assert reader.feed(b"\n\n") == [("message", b"d")]


@PROPERTY
@given(blob=_any_bytes, max_event_bytes=st.integers(1, 64), data=st.data())
def test_reader_never_holds_more_than_its_bound(
    blob: bytes, max_event_bytes: int, data: st.DataObject
) -> None:
    reader = SSEReader(max_event_bytes)

    for chunk in split_at(blob, data):
        reader.feed(chunk)
        # (a stream's first bytes may be held while they could still be a BOM)
        assert len(reader._buf) + reader._size <= max(max_event_bytes, 3)
        if reader.failed is not None:
            assert reader._buf == b""
            assert reader._data == []
    reader.close()


def test_events_before_an_over_limit_line_are_returned_with_the_failure() -> None:
    # The tap relies on this: a chunk may both end an event and start one over
    # the limit, and it must check ``failed`` even when events came back.
    reader = SSEReader(max_event_bytes=64)
    events = reader.feed(b"data: ok\n\ndata: " + b"x" * 100)
    assert events == [("message", b"ok")]
    assert reader.failed == "event exceeds max_event_bytes"
    assert reader.feed(b"\n\ndata: later\n\n") == [] and reader.close() == []
