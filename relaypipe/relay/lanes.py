"""Lanes: how the relay decoder drives one backend during a decode.

The decoder keeps one lane per model. It :meth:`~Lane.submit`\\ s a request whenever a relay
request passes to that model, and :meth:`~Lane.poll`\\ s the lane for the requests that came
back. Three kinds, by what the backend can do (:mod:`relaypipe.relay.backends`):

* :class:`StreamLane` (a backend with ``open_stream``, the in-process one): continuous batching.
  Each poll is one step of the backend's stream: one forward for every request it holds. A
  request that closes a command joins the teacher's next step; one whose teacher span ends
  joins the student's next step. Nobody waits for a batch-mate's hand-off.
* :class:`ThreadLane` (a backend with ``concurrent = True``, e.g. an HTTP server): each request
  is its own ``generate`` call on a worker thread, so requests progress independently and the
  engine behind the URL does the batching. A poll returns what has finished (it never waits).
* :class:`BatchLane` (any other backend): each poll is one ``generate`` call for every request
  submitted since the last poll (the decoder's rounds).
"""

from __future__ import annotations

from collections.abc import Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from relaypipe.relay.backends import Backend, GenRequest, GenResult
from relaypipe.relay.sampling import Sampling

Done = list[tuple[Hashable, GenResult]]


class Lane:
    """One backend's share of a decode: requests submitted, results polled."""

    def submit(self, request: GenRequest) -> None:
        raise NotImplementedError

    def poll(self) -> Done:
        """The requests that finished (a stream or batch lane computes to get them)."""
        raise NotImplementedError

    def __len__(self) -> int:
        """Requests submitted and not yet returned by poll."""
        raise NotImplementedError

    @property
    def computes(self) -> bool:
        """Whether a poll makes progress itself (else results arrive from threads)."""
        return True

    def due(self, others_busy: bool) -> bool:
        """Whether to poll now (a stream lane may hold new requests to batch them)."""
        return True

    def close(self) -> None:
        pass


class StreamLane(Lane):
    """``hold``: while the other lane has work and this stream has no request mid-run, new
    requests wait up to ``hold`` polls for company, so that several join one forward (the
    teacher's prefill of a hand-off costs a forward of its own; see the module docstring),
    and no longer once ``full`` requests wait (a full batch)."""

    def __init__(
        self,
        backend: Backend,
        stop_token_ids: frozenset[int],
        sampling: Sampling,
        hold: int = 0,
        full: int | None = None,
    ):
        self.stream = backend.open_stream(stop_token_ids, sampling)  # type: ignore[attr-defined]
        self.check = getattr(backend, "check", None)
        self.hold = hold
        self.full = full
        self.held = 0  # polls skipped since requests started waiting

    def due(self, others_busy: bool) -> bool:
        if not len(self.stream):
            return False
        full = self.full is not None and len(self.stream) >= self.full
        if self.held >= self.hold or not others_busy or self.stream.running or full:
            self.held = 0
            return True
        self.held += 1
        return False

    def submit(self, request: GenRequest) -> None:
        if self.check is not None:
            self.check(request)
        self.stream.add(request)

    def poll(self) -> Done:
        return self.stream.step() if len(self.stream) else []

    def __len__(self) -> int:
        return len(self.stream)


class BatchLane(Lane):
    def __init__(self, backend: Backend, stop_token_ids: frozenset[int], sampling: Sampling):
        self.backend, self.stops, self.sampling = backend, stop_token_ids, sampling
        self.queue: list[GenRequest] = []

    def submit(self, request: GenRequest) -> None:
        self.queue.append(request)

    def poll(self) -> Done:
        batch, self.queue = self.queue, []
        if not batch:
            return []
        results = self.backend.generate(batch, stop_token_ids=self.stops, sampling=self.sampling)
        return [(r.key, res) for r, res in zip(batch, results, strict=True)]

    def __len__(self) -> int:
        return len(self.queue)


class ThreadLane(Lane):
    def __init__(self, backend: Backend, stop_token_ids: frozenset[int], sampling: Sampling):
        self.backend, self.stops, self.sampling = backend, stop_token_ids, sampling
        workers = int(getattr(backend, "concurrency", 8))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="relay-lane")
        self.pending: dict[Future, Hashable] = {}

    def submit(self, request: GenRequest) -> None:
        future = self.pool.submit(
            self.backend.generate, [request], stop_token_ids=self.stops, sampling=self.sampling
        )
        self.pending[future] = request.key

    def poll(self) -> Done:
        done = [f for f in self.pending if f.done()]
        # .result() re-raises a request's failure (e.g. TeacherUnavailable) in the decoder
        return [(self.pending.pop(f), f.result()[0]) for f in done]

    def __len__(self) -> int:
        return len(self.pending)

    @property
    def computes(self) -> bool:
        return False

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def open_lane(
    backend: Backend,
    stop_token_ids: frozenset[int],
    sampling: Sampling,
    rounds: bool = False,
    hold: int = 0,
    full: int | None = None,
) -> Lane:
    """The lane a backend supports best (module docstring); ``rounds``: a BatchLane whatever
    the backend (the decoder's round schedule, kept for comparison); ``hold``, ``full``: a
    stream lane's (:class:`StreamLane`)."""
    if rounds:
        return BatchLane(backend, stop_token_ids, sampling)
    if callable(getattr(backend, "open_stream", None)):
        return StreamLane(backend, stop_token_ids, sampling, hold, full)
    if getattr(backend, "concurrent", False):
        return ThreadLane(backend, stop_token_ids, sampling)
    return BatchLane(backend, stop_token_ids, sampling)


def wait_for_any(lanes: list[Lane]) -> None:
    """Block until some thread lane has a finished request."""
    futures = [f for lane in lanes if isinstance(lane, ThreadLane) for f in lane.pending]
    if futures:
        wait(futures, return_when=FIRST_COMPLETED)
