"""The concurrency limiter: slots, a FIFO line, its bound, and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from llmproxy.errors import QueueFullError
from llmproxy.limiter import Limiter


async def settle() -> None:
    """Let every runnable task run until it waits again."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_slots_up_to_the_limit_then_a_line() -> None:
    limiter = Limiter("up", 2, 5)
    assert limiter.try_acquire() and limiter.try_acquire()
    assert not limiter.try_acquire()
    assert limiter.inflight == 2 and limiter.queued == 0
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    assert not waiter.done() and limiter.queued == 1
    limiter.release()
    await asyncio.wait_for(waiter, 1)
    assert limiter.inflight == 2 and limiter.queued == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    limiter = Limiter("up", 1, 10)
    await limiter.acquire()
    served: list[int] = []

    async def take(n: int) -> None:
        await limiter.acquire()
        served.append(n)

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(take(n)))
        await settle()  # each joins the line before the next arrives
    assert limiter.queued == 5
    for expected in range(5):
        limiter.release()
        await settle()
        assert served == list(range(expected + 1))
    await asyncio.gather(*tasks)
    limiter.release()
    assert limiter.inflight == 0


async def test_a_full_line_refuses_at_once() -> None:
    limiter = Limiter("up", 1, 1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    with pytest.raises(QueueFullError) as caught:
        await asyncio.wait_for(limiter.acquire(), 1)
    err = caught.value
    assert err.status == 503 and err.error_type == "queue_full"
    assert err.upstream == "up" and err.retry_after is not None
    assert limiter.queued == 1 and limiter.inflight == 1  # the refusal took nothing
    limiter.release()
    await asyncio.wait_for(waiter, 1)
    limiter.release()
    assert limiter.inflight == 0


async def test_no_line_at_all_with_max_queue_zero() -> None:
    limiter = Limiter("up", 1, 0)
    await limiter.acquire()
    with pytest.raises(QueueFullError):
        await limiter.acquire()


async def test_release_hands_the_slot_to_the_next_waiter() -> None:
    limiter = Limiter("up", 1, 2)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    limiter.release()
    # The slot passed on: a newcomer may not take it before the waiter runs.
    assert limiter.inflight == 1
    assert not limiter.try_acquire()
    await asyncio.wait_for(waiter, 1)
    assert limiter.inflight == 1
    limiter.release()
    assert limiter.inflight == 0
    assert limiter.try_acquire()


async def test_a_cancelled_waiter_leaves_the_line_and_leaks_nothing() -> None:
    limiter = Limiter("up", 1, 2)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    second = asyncio.create_task(limiter.acquire())
    await settle()
    assert limiter.queued == 2
    first.cancel()
    await settle()
    assert first.cancelled()
    assert limiter.queued == 1
    limiter.release()
    await asyncio.wait_for(second, 1)  # the slot skipped the cancelled waiter
    limiter.release()
    assert (limiter.inflight, limiter.queued) == (0, 0)


async def test_a_waiter_cancelled_as_the_slot_arrives_passes_it_on() -> None:
    limiter = Limiter("up", 1, 2)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    second = asyncio.create_task(limiter.acquire())
    await settle()
    limiter.release()  # hands the slot to the first waiter...
    first.cancel()  # ...which is cancelled before it could resume
    await settle()
    assert first.cancelled()
    await asyncio.wait_for(second, 1)
    assert limiter.inflight == 1
    limiter.release()
    assert (limiter.inflight, limiter.queued) == (0, 0)


async def test_a_waiter_cancelled_as_the_slot_arrives_frees_it() -> None:
    limiter = Limiter("up", 1, 1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    limiter.release()
    waiter.cancel()
    await settle()
    assert waiter.cancelled()
    assert (limiter.inflight, limiter.queued) == (0, 0)
    assert limiter.try_acquire()


async def test_many_cancellations_leave_the_limiter_whole() -> None:
    limiter = Limiter("up", 2, 50)
    holders = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(40)]
    await asyncio.gather(*holders)
    await settle()
    assert limiter.queued == 40
    for i, task in enumerate(waiters):
        if i % 3 == 0:
            task.cancel()
    for _ in range(2):
        limiter.release()
        await settle()
    survivors = [t for i, t in enumerate(waiters) if i % 3 != 0]
    while any(not t.done() for t in survivors):
        limiter.release()
        await settle()
    for _ in range(2):
        limiter.release()
    assert (limiter.inflight, limiter.queued) == (0, 0)
