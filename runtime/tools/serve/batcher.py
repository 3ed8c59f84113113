"""One worker thread over one shared :class:`Generator`, fed by a bounded queue.

Requests that can share a batch (same sampler, steps, eta, spacing, size, starting step, and
inpainting or not: ``Job.batch_key``) and are waiting together run as one batch, up to
``Limits.max_batch`` images. Each image keeps its own noise stream, so a request's images
are the same bytes alone or batched. A request
that is cancelled (its client went away) or whose rows go non-finite ends alone; the rest of
its batch finishes.

The event loop never blocks on the model: it submits a :class:`Ticket` and awaits it; the
worker reports steps and completion back through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ddpm_rt.errors import Cancelled
from ddpm_rt.progress import StepInfo
from ddpm_rt.tools.serve.api import GenerateRequest, Limits, RequestError, check_calls


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests: answer 503 with Retry-After."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Stopping(Exception):
    """The server is shutting down and takes no new work."""


class Ticket:
    """One request on its way through the queue: what it asked, and how it ended
    (``images`` (N, H, W, 3) uint8, or ``error``)."""

    def __init__(
        self,
        request: GenerateRequest,
        loop: asyncio.AbstractEventLoop,
        on_step: Callable[[StepInfo], None] | None,
    ):
        self.request = request
        self.arrived = time.monotonic()
        self.times = {"submitted": self.arrived}  # -> queued, started, finished
        self.cancelled = threading.Event()
        self.images: np.ndarray | None = None
        self.error: BaseException | None = None
        self.batch_images = 0  # images in the batch it ran in
        self.job = None  # the generator's Job: the request resolved to rows
        self._loop = loop
        self._on_step = on_step
        self._done = loop.create_future()

    def server_timing(self) -> str:
        """A ``Server-Timing`` header: ms spent resolving to rows, queued, running."""
        t = self.times
        spans = (
            ("prepare", "submitted", "queued"),
            ("queue", "queued", "started"),
            ("run", "started", "finished"),
        )
        return ", ".join(
            f"{name};dur={1e3 * (t[b] - t[a]):.1f}" for name, a, b in spans if a in t and b in t
        )

    def cancel(self) -> None:
        """Stop this request at its next step (its client went away); thread-safe."""
        self.cancelled.set()

    async def wait(self) -> Ticket:
        """Until it ends; a cancelled wait (the client went away) cancels the work."""
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.cancel()
            raise
        return self

    # -- worker side --------------------------------------------------------------------
    def step(self, info: StepInfo) -> None:
        if self._on_step is not None:
            self._loop.call_soon_threadsafe(self._on_step, info)

    def finish(self) -> None:
        def resolve(fut=self._done):
            if not fut.done():
                fut.set_result(None)

        try:
            self._loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class Batcher:
    """The shared queue and its worker. ``submit`` from the event loop; ``close`` at
    shutdown (stop taking work, cancel what is left after ``grace`` seconds)."""

    def __init__(self, generator, limits: Limits):
        self.gen = generator
        self.limits = limits
        self._cond = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._closing = False
        self._deadline = float("inf")
        self.batches: Counter[int] = Counter()  # images per batch -> batches run
        self.counts: Counter[str] = Counter()  # done / cancelled / failed
        self._step_seconds = 0.1  # a running estimate, for Retry-After
        # requests expected back together: the last batch's, or half the expectation
        # before it if larger (a small batch between two large ones must not shrink the
        # next wait to its size)
        self._expect = 0
        self._last_seconds = 0.0  # how long the last batch ran (decaying like _expect)
        self._busy_seconds = 0.0  # running batches, since the start
        self._preparing = 0  # admitted, being resolved to rows
        self._thread = threading.Thread(target=self._work, name="ddpm-rt-serve", daemon=True)
        self._thread.start()

    # -- event-loop side ----------------------------------------------------------------
    async def submit(
        self, request: GenerateRequest, on_step: Callable[[StepInfo], None] | None = None
    ) -> Ticket:
        """Queue a validated request: refused at once (:class:`QueueFull`, :class:`Stopping`)
        when there is no room, else resolved to rows by ``Generator.prepare`` (off the event
        loop: it runs the text encoder; its :class:`InputError` propagates) and queued."""
        ticket = Ticket(request, asyncio.get_running_loop(), on_step)
        with self._cond:
            self._admit()
            self._preparing += 1
        try:
            r = request
            ticket.job = await asyncio.to_thread(
                self.gen.prepare,
                r.prompts,
                negative_prompt=r.negative_prompt,
                config=r.config,
                callback=self._callback(ticket),
                preview_every=r.preview_every,
                init_image=r.init_image,
                mask=r.mask,
            )
            if r.init_image is not None:  # the job holds them now, at the model's size
                ticket.request = replace(r, init_image=None, mask=None)
        finally:
            with self._cond:
                self._preparing -= 1
        steps = ticket.job.config.steps
        check_calls(ticket.job.steps_run, ticket.job.config.resample, self.limits)
        if steps is not None and steps > self.limits.max_steps:  # a default from the bundle
            raise RequestError(
                422,
                f"the model's default of {steps} steps for {ticket.job.config.sampler} is over "
                f"this server's limit of {self.limits.max_steps}: give steps",
                "steps",
            )
        with self._cond:
            if self._closing:
                raise Stopping("the server is shutting down")
            self._queue.append(ticket)
            ticket.arrived = ticket.times["queued"] = time.monotonic()
            self._cond.notify()
        return ticket

    def _admit(self) -> None:
        if self._closing:
            raise Stopping("the server is shutting down")
        if len(self._queue) + len(self._running) + self._preparing >= self.limits.max_queue:
            raise QueueFull(self._retry_after())

    def status(self) -> dict:
        with self._cond:
            return {
                "status": "stopping" if self._closing else "ok",
                "queued": len(self._queue),
                "running": len(self._running),
                "batches": {str(k): v for k, v in sorted(self.batches.items())},
                "busy_s": round(self._busy_seconds, 3),
                **{k: self.counts[k] for k in ("done", "cancelled", "failed")},
            }

    def close(self, grace: float) -> None:
        """Take no more work; what is queued or running may finish within ``grace`` seconds,
        then it is cancelled. Safe from a signal handler (it only sets flags and notifies)."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + grace
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _retry_after(self) -> int:
        """Seconds until there is likely room: the work ahead (queued, running, and the
        requests still being resolved, counted as one image each), a batch at a time."""
        tickets = (*self._queue, *self._running)
        ahead = sum(t.request.images for t in tickets) + self._preparing
        rounds = ahead / max(1, self.limits.max_batch) + 1
        steps = max((t.job.config.steps for t in tickets), default=10)
        return max(1, round(rounds * steps * self._step_seconds))

    # -- worker side --------------------------------------------------------------------
    def _expired(self) -> bool:
        return time.monotonic() > self._deadline

    def _enough(self, key) -> bool:
        """Whether the queue already holds a full batch for ``key`` (caller holds the lock)."""
        same = [t for t in self._queue if t.job.batch_key == key]
        images = sum(t.request.images for t in same)
        return images >= self.limits.max_batch or len(same) >= max(2, self._expect)

    def _next_batch(self) -> list[Ticket] | None:
        """Wait for work; take the oldest request and the queued ones that may share its
        batch, up to ``max_batch`` images. None once closed and empty."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue[0]
            # Under concurrent load (the last batch was shared, or others already wait) the
            # oldest request waits a moment for company: clients answered together come
            # back spread over their turnaround. The wait is the batch window, or a tenth of
            # the last batch's time if longer (so at most ~10 % more latency), and ends
            # early once as many requests wait as are expected back or the batch is full.
            # A lone client never waits.
            if self._expect > 1 or len(self._queue) > 1:
                window = max(self.limits.batch_window_s, 0.1 * self._last_seconds)
                until = first.arrived + window
                while (
                    not self._closing
                    and not self._enough(first.job.batch_key)
                    and (wait := until - time.monotonic()) > 0
                ):
                    self._cond.wait(wait)
            key, room = first.job.batch_key, self.limits.max_batch
            group, rest = [], deque()
            while self._queue:
                t = self._queue.popleft()
                fits = t.request.images <= room or not group
                if t.job.batch_key == key and fits and not t.cancelled.is_set():
                    group.append(t)
                    room -= t.request.images
                elif t.cancelled.is_set():
                    t.error = Cancelled("cancelled before it started")
                    self.counts["cancelled"] += 1
                    t.finish()
                else:
                    rest.append(t)
            self._queue = rest
            self._running = group
            self._expect = max(len(group), self._expect // 2)
            return group

    def _work(self) -> None:
        while (group := self._next_batch()) is not None:
            if group:
                self._run(group)
            with self._cond:
                self._running = []

    def _run(self, group: list[Ticket]) -> None:
        images = sum(t.request.images for t in group)
        t0 = time.perf_counter()
        for ticket in group:
            ticket.batch_images = images
            ticket.times["started"] = time.monotonic()
        self._execute(group)
        seconds = time.perf_counter() - t0
        with self._cond:
            self.batches[images] += 1
            for t in group:
                e = t.error
                self.counts[
                    "done" if e is None else "cancelled" if isinstance(e, Cancelled) else "failed"
                ] += 1
            steps = max(1, max(t.request.config.steps or 10 for t in group))
            self._step_seconds = 0.8 * self._step_seconds + 0.2 * seconds / steps
            self._last_seconds = max(seconds, self._last_seconds / 2)  # as _expect
            self._busy_seconds += seconds
        for ticket in group:
            ticket.times["finished"] = time.monotonic()
            ticket.finish()

    def _callback(self, ticket: Ticket):
        def on_step(info: StepInfo) -> bool:
            if ticket.cancelled.is_set() or self._expired():
                return False
            ticket.step(info)
            return True

        return on_step

    def _execute(self, group: list[Ticket]) -> None:
        """Run a batch: every step one U-Net call over all the tickets' rows; each ticket
        gets ``images`` or ``error`` (a cancel or non-finite rows end only their own)."""
        jobs = [t.job for t in group]
        try:
            self.gen.run_jobs(jobs)
        except Exception as e:  # the batch as a whole failed (a backend error): all of it
            for t in group:
                t.error = e
            return
        for t, job in zip(group, jobs, strict=True):
            t.images, t.error = job.images, job.error
