"""The hand-off between a producer thread and its consumer (data/threads.py), and the stream and
loader built on it: failures cross threads, a stop is raised and never looks like the end of the
data, and no thread stays blocked."""

from __future__ import annotations

import threading
import time

import pytest

from side4video import signals
from side4video.data.stream import RankStream, resolve_shards
from side4video.data.threads import END, Closed, Handoff
from side4video.signals import StopRequested


def drain(handoff: Handoff) -> list:
    items = []
    while (item := handoff.get()) is not END:
        items.append(item)
    return items


def test_items_in_order_then_the_end():
    out = Handoff(2, what="numbers")
    out.start(lambda: [out.put(i) for i in range(10)], name="numbers")
    assert drain(out) == list(range(10))
    out.close()
    assert not out.producer.is_alive()


def test_the_producers_exception_is_raised_in_the_consumer_after_what_it_handed_over():
    out = Handoff(4, what="numbers")

    def produce():
        out.put(1)
        raise ValueError("shard 3 is unreadable")

    out.start(produce, name="failing")
    assert out.get() == 1
    with pytest.raises(ValueError, match="shard 3 is unreadable"):
        out.get()
    out.close()


@pytest.mark.timeout(30)
def test_close_frees_a_producer_blocked_on_a_full_handoff():
    out = Handoff(1, what="numbers")
    gave_up = threading.Event()

    def produce():
        for i in range(100):
            if not out.put(i):
                gave_up.set()
                return

    out.start(produce, name="blocked")
    assert out.get() == 0
    time.sleep(0.3)  # the producer is blocked on the full queue
    t0 = time.monotonic()
    out.close(join_s=10)
    assert gave_up.is_set() and not out.producer.is_alive() and time.monotonic() - t0 < 2
    assert not out.put("late")  # nothing is handed over once closed


@pytest.mark.timeout(30)
def test_a_stop_request_ends_the_wait_but_not_the_delivery(monkeypatch):
    out = Handoff(4, what="data")
    release = threading.Event()

    def produce():
        out.put("built before the stop")
        release.wait(20)  # then stalls, as a shard server that stopped answering

    out.start(produce, name="stalled")
    monkeypatch.setattr(signals, "stop_requested", lambda: True)
    monkeypatch.setattr(signals, "stop_reason", lambda: "SIGTERM")
    time.sleep(0.2)
    assert out.get() == "built before the stop"  # what was built is still handed over
    with pytest.raises(StopRequested, match=r"stop requested \(SIGTERM\) while waiting for data"):
        out.get()
    release.set()
    out.close()


def test_a_closed_handoff_raises_even_with_items_queued():
    stop = threading.Event()
    out = Handoff(4, what="data", stop=stop)
    out.start(lambda: [out.put(i) for i in range(3)], name="quick")
    assert out.get() == 0
    stop.set()  # the owner's stop counts as closing it
    with pytest.raises(Closed):
        out.get()
    out.close()


def test_a_producer_that_died_silently_is_an_error():
    out = Handoff(1, what="batches")
    out.producer = threading.Thread(target=lambda: None, name="loader-train-0")
    out.producer.start()
    out.producer.join()
    with pytest.raises(RuntimeError, match="loader-train-0 ended without delivering its batches"):
        out.get()


@pytest.mark.timeout(120)
def test_a_stopped_stream_raises_instead_of_ending_like_its_last_shard(synthetic_data):
    """The consumer's stop ends a RankStream with Closed: before, it ended quietly, as if the
    shards were exhausted; its reader threads end too."""
    stop = threading.Event()
    stream = RankStream(resolve_shards(str(synthetic_data["val"])), None, epoch=0, workers=2, stop=stop, queue_size=1)
    samples = iter(stream)
    assert next(samples).index == 0
    stop.set()
    with pytest.raises(Closed):
        next(samples)
    readers = [h.producer for h in stream._handoffs]
    assert len(readers) == 2 and not any(t.is_alive() for t in readers)
