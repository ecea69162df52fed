"""The micro-batcher: one worker thread owns the model and runs jobs that arrive together as
one batch. Requests are validated before they get here (see :mod:`relaypipe.serve.protocol`),
and engines keep one job's failure from failing the others, so a batch is only a way to share
the model's forward passes, never a shared fate."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

from relaypipe.serve.engines import Completion, Engine, Job, settle
from relaypipe.serve.protocol import ServeLimits

log = logging.getLogger(__name__)


class MicroBatcher:
    """The one thread that touches the model; gathers jobs arriving together into a batch."""

    def __init__(self, engine: Engine, limits: ServeLimits):
        self.engine = engine
        self.max_batch = max(1, min(limits.max_batch, engine.max_batch))
        self.wait_s = limits.batch_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="relaypipe-serve", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        while True:  # anything still queued will never run
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                settle(job.future, error=RuntimeError("server shutting down"))

    def submit(self, job: Job) -> Future[list[Completion]]:
        self._queue.put(job)
        return job.future

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` and whatever arrives within the wait (up to max_batch); and whether the
        stop sentinel came."""
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, stop = self._gather(job)
            # a request whose client has gone (its future cancelled) is dropped; the others are
            # marked running, so a late cancel cannot make setting their results raise
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if batch:
                log.debug("running %d job(s)", len(batch))
                self._run(batch)
            if stop:
                return

    def _run(self, batch: list[Job]) -> None:
        try:
            self.engine.run(batch)
        except Exception as err:  # engines settle their own jobs; this is a last resort
            log.exception("engine failed on a batch of %d", len(batch))
            if len(batch) > 1:
                for j in batch:
                    if not j.future.done():
                        self._run([j])
                return
            settle(batch[0].future, error=err)
        for j in batch:  # an engine that forgot a job must not leave its client waiting
            settle(j.future, error=RuntimeError("the engine returned no result"))


# the name used before the package split
_Worker = MicroBatcher
