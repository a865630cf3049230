"""The virtual clock: waiting costs no wall time, timers fire in order at exact virtual instants,
asyncio's primitives work on it, and a stuck or runaway simulation fails loudly instead of hanging."""

from __future__ import annotations

import asyncio
import time

import pytest

from qlab.backends.sim import (
    SimulationDeadlock,
    SimulationLimitExceeded,
    VirtualTimeLoop,
    loop_factory,
    run,
)


def test_long_sleeps_cost_no_wall_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(5)
        t1 = loop.time()
        await asyncio.sleep(3 * 24 * 3600)  # longer than asyncio's 1-day cap on one select() timeout
        return t1 - t0, loop.time() - t1

    wall = time.perf_counter()
    five, three_days = run(main())
    assert five == pytest.approx(5.0, abs=1e-9)
    assert three_days == pytest.approx(3 * 24 * 3600, abs=1e-6)
    assert time.perf_counter() - wall < 0.5


def test_loop_is_a_selector_loop_and_clock_starts_where_asked() -> None:
    async def main() -> float:
        assert isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop)
        return asyncio.get_running_loop().time()

    assert run(main(), start=1000.0) == 1000.0
    with asyncio.Runner(loop_factory=loop_factory(start=7.5)) as runner:
        assert runner.run(main()) == 7.5


def test_timers_fire_in_time_order_at_their_exact_instants() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float]] = []
        done = loop.create_future()

        def mark(name: str) -> None:
            fired.append((name, loop.time()))
            if len(fired) == 5:
                done.set_result(None)

        loop.call_later(3.0, mark, "later-3")
        loop.call_at(loop.time() + 0.25, mark, "at-0.25")
        loop.call_later(1.0, mark, "later-1")
        loop.call_soon(mark, "soon")
        h = loop.call_later(2.0, mark, "cancelled")
        h.cancel()
        loop.call_later(0.001, mark, "later-0.001")
        loop.call_later(2.5, mark, "later-2.5")
        await done
        return fired

    assert run(main()) == [
        ("soon", 0.0),
        ("later-0.001", pytest.approx(0.001, abs=1e-12)),
        ("at-0.25", 0.25),
        ("later-1", 1.0),
        ("later-2.5", 2.5),
    ]


def test_tasks_futures_gather_wait_for_and_timeout() -> None:
    async def worker(delay: float, value: int) -> int:
        await asyncio.sleep(delay)
        return value

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        out: dict = {}
        out["gather"] = await asyncio.gather(worker(2, 1), worker(1, 2), worker(3, 3))
        out["after_gather"] = loop.time()
        fut = loop.create_future()
        loop.call_later(0.5, fut.set_result, "ok")
        out["future"] = await fut
        try:
            await asyncio.wait_for(worker(10, 0), timeout=1.5)
        except TimeoutError:
            out["wait_for_timeout_at"] = loop.time()
        try:
            async with asyncio.timeout(0.2):
                await asyncio.Event().wait()
        except TimeoutError:
            out["timeout_cm_at"] = loop.time()
        task = asyncio.create_task(worker(100, 0))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        out["end"] = loop.time()
        return out

    out = run(main())
    assert out["gather"] == [1, 2, 3]
    assert out["after_gather"] == 3.0  # concurrent sleeps overlap: max, not sum
    assert out["future"] == "ok"
    assert out["wait_for_timeout_at"] == pytest.approx(5.0)
    assert out["timeout_cm_at"] == pytest.approx(5.2)
    assert out["end"] == pytest.approx(6.2)


def test_deadlock_is_reported_with_the_waiting_task() -> None:
    async def stuck() -> None:
        await asyncio.get_running_loop().create_future()  # nobody will ever set it

    wall = time.perf_counter()
    with pytest.raises(SimulationDeadlock, match=r"simulation deadlock at t=2\.000000.*main -> .*stuck at test_sim_clock.py:\d+"):
        async def main() -> None:
            await asyncio.sleep(2)
            await stuck()

        run(main())
    assert time.perf_counter() - wall < 1.0


def test_waiting_for_an_event_nobody_sets_is_a_deadlock_not_a_hang() -> None:
    async def main() -> None:
        ev = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, lambda: None)  # a timer, but it does not set ev
        await ev.wait()

    with pytest.raises(SimulationDeadlock, match=r"t=1\.000000"):
        run(main())


def test_runaway_timer_hits_max_time() -> None:
    async def main() -> None:
        while True:
            await asyncio.sleep(1.0)

    with pytest.raises(SimulationLimitExceeded, match="max_time=100"):
        run(main(), max_time=100.0)


def test_spinning_task_hits_max_iterations() -> None:
    async def main() -> None:
        while True:
            await asyncio.sleep(0)

    with pytest.raises(SimulationLimitExceeded, match="max_iterations=1000"):
        run(main(), max_iterations=1000)


def test_executor_jobs_take_no_virtual_time_and_threadsafe_calls_arrive() -> None:
    """Threads are not simulated: the clock stays frozen while an executor job runs, even with a far
    timer pending, and results posted with call_soon_threadsafe get through."""

    async def main() -> tuple[int, str, float]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def job() -> int:
            time.sleep(0.02)
            loop.call_soon_threadsafe(fut.set_result, "from thread")
            return 42

        got = await asyncio.wait_for(loop.run_in_executor(None, job), timeout=60)
        msg = await asyncio.wait_for(fut, timeout=60)
        return got, msg, loop.time()

    assert run(main()) == (42, "from thread", 0.0)


def test_same_program_gives_the_same_event_order() -> None:
    async def main() -> list[tuple[float, int]]:
        loop = asyncio.get_running_loop()
        rng = loop.rng  # type: ignore[attr-defined]
        log: list[tuple[float, int]] = []

        async def node(i: int) -> None:
            for _ in range(20):
                await asyncio.sleep(rng.random() / 10)
                log.append((loop.time(), i))

        await asyncio.gather(*(node(i) for i in range(10)))
        return log

    a, b, c = run(main(), seed=5), run(main(), seed=5), run(main(), seed=6)
    assert a == b
    assert a != c


def test_virtual_loop_can_be_reused_through_a_runner() -> None:
    loop = VirtualTimeLoop()
    try:
        assert loop.run_until_complete(asyncio.sleep(1, result="x")) == "x"
        assert loop.run_until_complete(asyncio.sleep(2, result="y")) == "y"
        assert loop.time() == 3.0
        assert loop.elapsed == 3.0
    finally:
        loop.close()
