"""One hand-off between threads: a bounded queue from a producer thread to a consumer that never
waits blindly.

Used twice: from each shard reader to the merge of a `RankStream` (stream.py), and from the
loader's batch builder to the training loop (loader.py). The rules are the same for both:

- `start(target)` runs the producer in a daemon thread; if `target` raises, the exception is
  handed over and re-raised in the consumer's thread (the `Failure` wrapper); when it returns,
  `END` follows its last item.
- `put` blocks while the hand-off is full and gives up (returns False) once it is closed: a
  producer whose consumer has gone returns instead of hanging on a full queue.
- `get` polls, so that a wait always ends:
  - `Closed` at once when the hand-off is closed (or its owner's `stop` event is set), even
    with items queued: whoever closed it wants nothing more from it;
  - `StopRequested` when a stop was requested (side4video/signals.py) and nothing is queued: a
    stop request ends waiting, not delivery, so what was already built is still handed over;
  - `RuntimeError` when the producer thread ended without handing over its end or its failure;
  - the producer's own exception, re-raised.
- `close()` closes, drops what is queued (a producer blocked on a full queue is free at once)
  and joins the producer.

One behaviour on stop: a stop is raised, never returned as a value. The two copies this replaces
differed: the loader raised `StopRequested`, while a `RankStream` whose consumer stopped simply
ended, which a consumer cannot tell from the end of the shards (a stop in the middle of a batch
read like the last, short batch of an epoch). Raising keeps "stopped" and "no more data" two
distinct outcomes all the way up; `Closed` reaches only the thread of the owner that closed the
hand-off (the loader stopping its builder), which expects it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

from side4video import signals
from side4video.signals import StopRequested

POLL_S = 0.1  # how often a blocked put or get looks at the stop conditions


class Closed(Exception):
    """The hand-off was closed (or its owner's stop event set) while a consumer waited on it."""


class Failure:
    """An exception the producer ended with, on its way to the consumer's thread."""

    def __init__(self, exc: BaseException):
        self.exc = exc


END = object()  # the producer returned: nothing follows


class Handoff:
    """A bounded, stop-aware queue from one producer thread to one consumer (see the module doc).

    `stop`: an event of the owner that counts as closing this hand-off, for owners that stop
    several hand-offs, or a thread they do not own, with one event.
    """

    def __init__(self, maxsize: int, *, what: str, stop: Optional[threading.Event] = None, poll_s: float = POLL_S):
        self.what = what  # named in errors: "shard data", "batches"
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(maxsize)))
        self._closed = threading.Event()
        self._stop = stop
        self._poll_s = float(poll_s)
        self.producer: Optional[threading.Thread] = None

    @property
    def closed(self) -> bool:
        return self._closed.is_set() or (self._stop is not None and self._stop.is_set())

    # -- the producer's side --------------------------------------------------------------------
    def start(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Run `target()` in a daemon thread that puts its items; then END, or its failure."""

        def run() -> None:
            try:
                target()
            except BaseException as e:  # handed to the consumer, which re-raises it
                self.put(Failure(e))
            else:
                self.put(END)

        if self.producer is not None:
            raise RuntimeError(f"the hand-off of {self.what} already has a producer")
        self.producer = threading.Thread(target=run, name=name, daemon=True)
        self.producer.start()
        return self.producer

    def put(self, item: Any) -> bool:
        """Hand `item` over; False (and nothing handed over) once the hand-off is closed."""
        while not self.closed:
            try:
                self._queue.put(item, timeout=self._poll_s)
                return True
            except queue.Full:
                continue
        return False

    # -- the consumer's side --------------------------------------------------------------------
    def get(self) -> Any:
        """The next item (END after the last one); raises as the module doc says."""
        while True:
            if self.closed:
                raise Closed(f"the hand-off of {self.what} was closed")
            try:
                item = self._queue.get(timeout=self._poll_s)
            except queue.Empty:
                if signals.stop_requested():
                    raise StopRequested(
                        f"stop requested ({signals.stop_reason()}) while waiting for {self.what}"
                    ) from None
                producer = self.producer
                if producer is not None and not producer.is_alive() and self._queue.empty():
                    raise RuntimeError(f"{producer.name} ended without delivering its {self.what}") from None
                continue
            if isinstance(item, Failure):
                raise item.exc
            return item

    def close(self, join_s: float = 5.0) -> None:
        """Close, drop what is queued, and wait up to `join_s` for the producer to return."""
        self._closed.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        producer = self.producer
        if producer is not None and producer is not threading.current_thread():
            producer.join(timeout=join_s)
