"""The tests' own waiting helper: woken by the step that makes its condition true."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.waiting import wait_until


async def test_wait_until_returns_once_the_condition_holds_and_not_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    count = 0
    resume = trio.Event()

    async def count_up() -> None:
        nonlocal count
        for _ in range(5):
            await trio.lowlevel.checkpoint()
            count += 1
            if count == 3:
                await resume.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_up)
        with trio.fail_after(10):
            await wait_until(lambda: count >= 3)
        assert count == 3
        with trio.move_on_after(60) as waited:  # clock seconds: nothing more happens
            await wait_until(lambda: count >= 4)
        assert waited.cancelled_caught
        resume.set()
        with trio.fail_after(10):
            await wait_until(lambda: count == 5)


async def test_wait_until_on_an_autojump_clock(autojump_clock: trio.testing.MockClock) -> None:
    done = False

    async def later() -> None:
        nonlocal done
        await trio.sleep(100)
        done = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        with trio.fail_after(200):
            await wait_until(lambda: done)
        assert trio.current_time() == 100


async def test_wait_until_raises_what_its_condition_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def condition() -> bool:
        if trio.current_time() >= 1:
            raise LookupError("gone")
        return False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 1)
        with trio.fail_after(10), pytest.raises(LookupError, match="gone"):
            await wait_until(condition)
