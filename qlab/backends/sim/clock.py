"""Virtual time: an asyncio event loop whose clock jumps to the next timer when nothing is runnable.

A trial on the simulator is mostly waiting (link delays, retransmission and keepalive timers, NAT
binding timeouts). `VirtualTimeLoop` makes that waiting free: its `time()` is a number it owns, and
where asyncio would block in its selector for `timeout` seconds, it advances that number by
`timeout` and goes on at once. A 30 s idle timeout then costs microseconds of wall time, and what
happens depends only on the order of events, never on machine load. aioquic gets `now` from `loop.time()` through
its caller, so QUIC timers follow the virtual clock too.

Two ways a simulation can go wrong are reported instead of hanging:
- `SimulationDeadlock`: nothing is ready, no timer is scheduled and no outside work (an executor
  job) is pending, so the loop would wait forever;
- `SimulationLimitExceeded`: the run went past `max_time` virtual seconds or `max_iterations` loop
  iterations (a livelock such as a task spinning on `sleep(0)`, or a timer that keeps rescheduling).

The loop is a `SelectorEventLoop` on every OS (Windows' default Proactor loop cannot be driven this
way). It polls its real selector (the self-pipe) with a zero timeout every `REAL_POLL_EVERY`
iterations, and on every one while an executor job is pending, so `call_soon_threadsafe` callbacks
(which go to the ready queue at once) and executor results still arrive. Work in an executor
(`run_in_executor`) takes no virtual time: while a job is outstanding and nothing is ready, the loop
waits for it in real time with the clock frozen. Other threads are not tracked: virtual time runs
on without them.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import heapq
import random
import selectors
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, TypeVarTuple

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

DEFAULT_MAX_TIME = 7 * 24 * 3600.0  # virtual seconds per loop; a week is far beyond any trial
DEFAULT_MAX_ITERATIONS = 50_000_000  # loop iterations per loop; ~minutes of wall time
EXTERNAL_WAIT = 60.0  # wall seconds the clock stays frozen waiting for an executor job
REAL_POLL_EVERY = 64  # with no executor job pending, poll real fds (self-pipe) every this many iterations
CLOCK_RESOLUTION = 1e-9  # timers within 1 ns of "now" are due (absorbs float rounding of jumps)
# asyncio's own (base_events): the longest select() wait, and when its timer heap drops cancelled timers
MAXIMUM_SELECT_TIMEOUT = 24 * 3600
MIN_SCHEDULED_TIMER_HANDLES = 100
MIN_CANCELLED_FRACTION = 0.5


class SimulationError(RuntimeError):
    """Base class of the virtual loop's own errors."""


class SimulationDeadlock(SimulationError):
    """Nothing can ever happen again, yet the loop was asked to keep running."""


class SimulationLimitExceeded(SimulationError):
    """The run passed its bound on virtual time or loop iterations."""


class _Timer(asyncio.TimerHandle):
    """A timer of the virtual loop. Its heap entry is `(when, timer)`: tuples compare their floats in
    C, and on a tie compare the timers, whose identity equality (not TimerHandle's, which compares
    callbacks and arguments) sends the tuple to `__lt__`, false on equal times. So the heap orders
    exactly as asyncio's heap of TimerHandles does, ties included, at a fraction of the cost."""

    __slots__ = ()
    __eq__ = object.__eq__
    __hash__ = object.__hash__
    # TimerHandle's own, which typeshed does not declare
    _scheduled: bool
    _source_traceback: traceback.StackSummary | None


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock (see the module docstring).

    `start` is the clock's value at creation. `max_time` bounds how far the clock may run past
    `start` and `max_iterations` how many loop iterations may run; `None` disables a bound. `seed`
    feeds `self.rng`, a `random.Random` for simulation code that has no seed of its own.

    It runs asyncio's own iteration (`BaseEventLoop._run_once`, same order of callbacks and timers)
    with the waiting replaced by a jump of the clock, written out here so that an iteration costs
    little: timers sit in a heap of `(when, timer)` tuples (see `_Timer`) and the real selector (the
    self-pipe, executor results) is polled only now and then while nothing outside is pending.
    """

    # asyncio's own, which typeshed does not declare
    _scheduled: list[tuple[float, _Timer]]  # the timer heap, here of (when, timer) entries
    _ready: collections.deque[asyncio.Handle]
    _stopping: bool
    _timer_cancelled_count: int
    _current_handle: asyncio.Handle | None
    _closed: bool
    _debug: bool
    _check_closed: Callable[[], None]
    _check_thread: Callable[[], None]
    _check_callback: Callable[[Callable[..., object], str], None]
    _process_events: Callable[[list[tuple[selectors.SelectorKey, int]]], None]

    def __init__(
        self,
        *,
        start: float = 0.0,
        max_time: float | None = DEFAULT_MAX_TIME,
        max_iterations: int | None = DEFAULT_MAX_ITERATIONS,
        seed: int | str | None = 0,
    ) -> None:
        self._real = selectors.DefaultSelector()  # the self-pipe lives here
        super().__init__(self._real)
        self._clock_resolution = CLOCK_RESOLUTION
        self._now = float(start)
        self._start = float(start)
        self.max_time = max_time
        self.max_iterations = max_iterations
        self.iterations = 0
        self.rng = random.Random(seed)
        self._external_jobs = 0
        self._external_lock = threading.Lock()
        self._idle: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    # -- one iteration: asyncio's, with waiting replaced by a jump of the clock -------------------
    def call_soon(self, callback: Callable[[*Ts], object], *args: *Ts,
                  context: contextvars.Context | None = None) -> asyncio.Handle:
        if self._debug:
            return super().call_soon(callback, *args, context=context)
        if self._closed:  # asyncio's check and Handle, in fewer calls (every callback comes here)
            raise RuntimeError("Event loop is closed")
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_at(self, when: float, callback: Callable[[*Ts], object], *args: *Ts,
                context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        if self._closed:
            raise RuntimeError("Event loop is closed")
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_at")
        timer = _Timer(when, callback, args, self, context)
        if self._debug and timer._source_traceback:
            del timer._source_traceback[-1]
        heapq.heappush(self._scheduled, (when, timer))
        timer._scheduled = True
        return timer

    def _run_once(self) -> None:
        scheduled = self._scheduled
        # asyncio purges the heap only when over half of more than 100 timers are cancelled (so never
        # with 50 or fewer), else pops cancelled ones off its head: nothing to do in the usual case
        if scheduled and (scheduled[0][1]._cancelled or self._timer_cancelled_count > MIN_SCHEDULED_TIMER_HANDLES / 2):
            self._drop_cancelled()
            scheduled = self._scheduled
        ready = self._ready
        timeout: float | None = None
        if ready or self._stopping:
            timeout = 0
        elif scheduled:
            timeout = min(max(0, scheduled[0][0] - self._now), MAXIMUM_SELECT_TIMEOUT)
        n = self.iterations = self.iterations + 1
        if self.max_iterations is not None and n > self.max_iterations:
            raise SimulationLimitExceeded(self._too_many())
        if timeout == 0:  # busy: callbacks are ready; look at real fds only now and then
            if not n % REAL_POLL_EVERY:
                self._poll_real(0)
        else:
            self._wait(timeout, n)
        end_time = self._now + self._clock_resolution
        while scheduled and scheduled[0][0] < end_time:
            timer = heapq.heappop(scheduled)[1]
            timer._scheduled = False
            ready.append(timer)
        debug = self._debug
        for _ in range(len(ready)):
            handle = ready.popleft()
            if handle._cancelled:
                continue
            if debug:  # a callback takes no virtual time: asyncio's slow-callback warning cannot fire
                self._current_handle = handle
            handle._run()
        self._current_handle = None

    def _drop_cancelled(self) -> None:
        """asyncio's clean-up of cancelled timers, at the same moments (the heap's shape decides the
        order of equal times)."""
        scheduled = self._scheduled
        count = len(scheduled)
        if count > MIN_SCHEDULED_TIMER_HANDLES and self._timer_cancelled_count / count > MIN_CANCELLED_FRACTION:
            kept = []
            for entry in scheduled:
                if entry[1]._cancelled:
                    entry[1]._scheduled = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            self._scheduled = kept
            self._timer_cancelled_count = 0
            return
        while scheduled and scheduled[0][1]._cancelled:
            self._timer_cancelled_count -= 1
            heapq.heappop(scheduled)[1]._scheduled = False

    def _wait(self, timeout: float | None, n: int) -> None:
        """Nothing is ready: outside events, then this instant's idle callbacks, then an executor
        job (waited for in real time, the clock frozen), else the clock jumps to the next timer."""
        if (self._external_jobs or not n % REAL_POLL_EVERY) and self._poll_real(0):
            return
        if self._idle:  # this instant is done: its idle callbacks run before the clock moves
            self._run_idle()
            return
        if self._external_jobs and self._poll_real(EXTERNAL_WAIT):
            return
        if timeout is None:
            raise SimulationDeadlock(self._deadlock_report())
        self._advance(timeout)

    def _poll_real(self, timeout: float) -> bool:
        events = self._real.select(timeout)
        if events:
            self._process_events(events)
        return bool(events)

    # -- the clock ----------------------------------------------------------------------------
    def time(self) -> float:
        return self._now

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the loop was created."""
        return self._now - self._start

    def _advance(self, seconds: float) -> None:
        now = self._now + seconds
        if self.max_time is not None and now - self._start > self.max_time:
            raise SimulationLimitExceeded(
                f"virtual time would pass max_time={self.max_time:g} s (next timer at t={now:.6f}); "
                "a timer keeps rescheduling itself, or raise max_time for a longer run"
            )
        self._now = now

    def _too_many(self) -> str:
        return (f"more than max_iterations={self.max_iterations} loop iterations at t={self._now:.6f} "
                "(virtual time stopped advancing: something is spinning, e.g. a loop over sleep(0))")

    def _deadlock_report(self) -> str:
        tasks = [t for t in asyncio.all_tasks(self) if not t.done()]
        shown = "; ".join(_describe_task(t) for t in tasks[:8])
        more = f" (+{len(tasks) - 8} more)" if len(tasks) > 8 else ""
        return (
            f"simulation deadlock at t={self._now:.6f}: nothing is ready and no timer is scheduled, "
            f"so nothing can happen again, but {len(tasks)} task(s) still wait: {shown}{more}"
        )

    def call_when_idle(self, callback: Callable[[*Ts], object], *args: *Ts) -> None:
        """Run `callback(*args)` once nothing else is ready at this virtual instant (every callback and
        timer due now has run), before the clock moves on. The simulator's CPU uses it to take the next
        datagram only after a role has done everything the last one caused."""
        self._idle.append((callback, args))

    def _run_idle(self) -> None:
        idle, self._idle = self._idle, []
        for callback, args in idle:
            self.call_soon(callback, *args)

    # -- outside work: keep the deadlock detector from firing while a thread may still call back --
    def _external_begin(self) -> None:
        with self._external_lock:
            self._external_jobs += 1

    def _external_end(self, *_: Any) -> None:
        with self._external_lock:
            self._external_jobs -= 1

    def run_in_executor(self, executor: concurrent.futures.Executor | None, func: Callable[[*Ts], T],
                        *args: *Ts) -> asyncio.Future[T]:
        fut = super().run_in_executor(executor, func, *args)
        self._external_begin()
        fut.add_done_callback(self._external_end)
        return fut

    async def shutdown_default_executor(self, *args: Any) -> None:
        self._external_begin()
        try:
            await super().shutdown_default_executor(*args)
        finally:
            self._external_end()


def _describe_task(task: asyncio.Task[Any]) -> str:
    """Task name, its coroutine and where the innermost awaiting coroutine is suspended."""
    coro: Any = task.get_coro()
    chain = [getattr(coro, "__qualname__", repr(coro))]
    frame = getattr(coro, "cr_frame", None)
    inner = getattr(coro, "cr_await", None)
    while inner is not None and getattr(inner, "cr_frame", None) is not None:
        chain.append(inner.__qualname__)
        frame = inner.cr_frame
        inner = getattr(inner, "cr_await", None)
    where = f" at {frame.f_code.co_filename.replace(chr(92), '/').rsplit('/', 1)[-1]}:{frame.f_lineno}" if frame else ""
    return f"{task.get_name()} {' -> '.join(chain)}{where}"


def loop_factory(**kwargs: Any) -> Callable[[], VirtualTimeLoop]:
    """A factory for `asyncio.Runner(loop_factory=...)` with VirtualTimeLoop options bound."""
    return lambda: VirtualTimeLoop(**kwargs)


def run(
    main: Coroutine[Any, Any, T],
    *,
    seed: int | str | None = 0,
    start: float = 0.0,
    max_time: float | None = DEFAULT_MAX_TIME,
    max_iterations: int | None = DEFAULT_MAX_ITERATIONS,
    debug: bool | None = None,
) -> T:
    """Run `main` to completion on a fresh VirtualTimeLoop, like `asyncio.run`."""
    factory = loop_factory(start=start, max_time=max_time, max_iterations=max_iterations, seed=seed)
    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)
