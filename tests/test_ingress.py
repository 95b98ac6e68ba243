"""The ingress's pure helpers, without a cluster."""

from __future__ import annotations

from ray.exceptions import ActorDiedError
from ray.serve.exceptions import RayServeException

from serve_app.ingress import _Upload, past_deadline, replica_lost, split_by_bytes


def _uploads(*sizes: int) -> list[_Upload]:
    return [_Upload(b"x" * size, 5, f"r{i}") for i, size in enumerate(sizes)]


def test_split_by_bytes_keeps_order_and_every_call_within_budget() -> None:
    uploads = _uploads(30, 10, 10, 50, 5, 5)
    parts = split_by_bytes(uploads, pixel_bytes=10, budget=60)
    assert [u for part in parts for u in part] == uploads
    assert [[u.request_id for u in part] for part in parts] == [["r0", "r1"], ["r2"], ["r3"], ["r4", "r5"]]
    assert all(sum(len(u.data) + 10 for u in part) <= 60 for part in parts)


def test_an_upload_larger_than_the_budget_travels_alone() -> None:
    parts = split_by_bytes(_uploads(5, 500, 5), pixel_bytes=0, budget=100)
    assert [[u.request_id for u in part] for part in parts] == [["r0"], ["r1"], ["r2"]]


def test_a_batch_within_budget_is_one_call() -> None:
    uploads = _uploads(*[1000] * 16)
    assert split_by_bytes(uploads, pixel_bytes=3 * 448 * 448, budget=2**30) == [uploads]


def test_a_stage_lost_upstream_counts_as_a_replica_lost() -> None:
    """Serve's router raises this when the Preprocessor whose pixels a Classifier call waits for has died."""
    upstream = RayServeException("Request to deployment 'Classifier' failed because an upstream actor died")
    upstream.__cause__ = ActorDiedError()
    assert replica_lost(ActorDiedError()) and replica_lost(upstream)
    assert not replica_lost(RayServeException("something else")) and not replica_lost(ValueError("bad image"))


def test_an_upload_that_would_miss_its_deadline_is_not_sent_on() -> None:
    uploads = [_Upload(b"x", 5, f"r{i}", deadline) for i, deadline in enumerate((110.0, 100.5, 99.0, float("inf")))]
    # A batch has recently taken 0.3 s: an upload is sent on only with at least twice that left.
    assert past_deadline(uploads, now=100.0, batch_s=0.3) == [False, True, True, False]
    assert past_deadline(uploads, now=100.0, batch_s=0.0) == [False, False, True, False]
