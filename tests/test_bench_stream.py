"""The stream benchmark's accounting (`vlm4rec.harness.bench._Tracker`): which interactions a push
answers, from the offsets it says its profile had applied, and how the unanswered count."""

from __future__ import annotations

import pytest

from vlm4rec.harness.bench_stream import UNANSWERED_MS, _Tracker
from topics import Rec, Recs


def recs(user: str, answers: dict[str, int], trigger: str = "interaction", items: tuple[str, ...] = ()) -> Recs:
    return Recs(user_id=user, items=[Rec(item_id=i, score=1.0) for i in items], trigger=trigger, model="m",
                generated_at=0.0, answers=answers)


def test_a_push_answers_only_the_interactions_its_profile_had_applied() -> None:
    tracker = _Tracker("interactions")
    first, second = tracker.sent("u", 100.0), tracker.sent("u", 100.5)
    other = tracker.sent("v", 100.0)
    tracker.delivered(first, 1, 10)
    tracker.delivered(second, 1, 11)
    tracker.delivered(other, 2, 3)
    tracker.on_recs(recs("u", {"interactions:1": 10, "vlm4rec-streams-control:1": 99}), 100.2)
    assert first.answered_ms is not None and round(first.answered_ms) == 200
    assert second.answered_ms is None, "offset 11 was not applied when that list was ranked"
    tracker.on_recs(recs("v", {"interactions:1": 50}), 100.3)  # another partition's offsets
    assert other.answered_ms is None
    tracker.on_recs(recs("u", {"interactions:1": 11}), 101.0)
    assert round(second.answered_ms) == 500
    latencies, answered = tracker.step_latencies()
    assert answered == 2 and [round(ms) for ms in sorted(latencies)] == [200, 500, UNANSWERED_MS]


def test_a_push_before_the_delivery_report_still_answers_and_steps_are_independent() -> None:
    tracker = _Tracker("interactions")
    early = tracker.sent("u", 10.0)
    tracker.on_recs(recs("u", {"interactions:0": 7}), 10.05)
    tracker.delivered(early, 0, 7)
    assert round(early.answered_ms) == 50
    tracker.new_step()
    late = tracker.sent("u", 20.0)
    tracker.delivered(late, 0, 8)
    assert tracker.step_latencies() == ([UNANSWERED_MS], 0)


def test_a_fresh_item_is_timed_at_its_first_push_only() -> None:
    tracker = _Tracker("interactions")
    tracker.fresh_sent["new"] = 5.0
    tracker.on_recs(recs("u", {}, "fresh_item", ("old", "new")), 5.4)
    tracker.on_recs(recs("v", {}, "fresh_item", ("new",)), 9.0)
    assert [round(ms) for ms in tracker.fresh_ms] == [400]
    tracker.fresh_sent["newer"] = 10.0
    tracker.on_recs(recs("w", {}, "interaction", ("newer",)), 10.3)
    assert [round(ms) for ms in tracker.fresh_ms] == [400, 300], "a list pushed for an interaction carries it as well"


def test_the_stack_processes_are_told_apart_by_their_arguments() -> None:
    from vlm4rec.harness.bench_stream import _ProcessCpu

    role = _ProcessCpu.role
    assert role(["/usr/bin/python3", "-m", "vlm4rec", "streams"]) == "streams"
    assert role(["/usr/bin/python3", "-m", "vlm4rec", "worker"]) == "worker"
    assert role(["/venv/bin/vlm4rec", "up", "--streams", "2"]) is None
    assert role(["/x/tansu", "broker", "--listener-url", "tcp://127.0.0.1:9092"]) == "broker"
    assert role(["/x/python", "-P", "-m", "vlm4rec.localstack.broker", "--port", "9092"]) == "broker"
    assert role(["/venv/bin/python3", "/venv/bin/milvus-lite", "server", "--port", "19530"]) == "milvus"
    assert role(["/usr/bin/python3", "-m", "pytest", "tests/test_milvus.py"]) is None


def test_the_nth_interaction_is_due_at_n_periods_into_the_step() -> None:
    from vlm4rec.harness.bench_stream import due_now

    assert due_now(0.0, 2.0, 60.0) == 1, "the first goes at once"
    assert due_now(0.49, 2.0, 60.0) == 1 and due_now(0.5, 2.0, 60.0) == 2
    assert due_now(59.99, 2.0, 60.0) == 120 == due_now(61.0, 2.0, 60.0)
    assert due_now(0.0105, 1000.0, 8.0) == 11


def test_a_step_reports_its_fresh_items_fanout_time_over_every_stream_processor() -> None:
    """`fresh_fanout_ms`: the pushes that fresh items' fan-outs asked for in the step, their
    mean and p99, from the histograms of all the stream processors."""
    from vlm4rec.harness.bench_stream import _stream_figures
    from vlm4rec.harness.soak import Scrape

    name = "vlm4rec_streams_fresh_item_seconds"

    def page(counts: dict[float, float], total: float) -> Scrape:
        rows = [(f"{name}_bucket", {"le": str(le)}, c) for le, c in counts.items()]
        return Scrape(rows + [(f"{name}_count", {}, counts[float("inf")]), (f"{name}_sum", {}, total)])

    before = [page({0.5: 10, 1.0: 10, float("inf"): 10}, 2.0), page({0.5: 0, 1.0: 0, float("inf"): 0}, 0.0)]
    after = [page({0.5: 40, 1.0: 50, float("inf"): 50}, 14.0), page({0.5: 30, 1.0: 50, float("inf"): 50}, 20.0)]
    fresh = _stream_figures(before, after, sent=0)["fresh_fanout_ms"]
    assert fresh["pushes"] == 90
    assert fresh["mean"] == pytest.approx(1000 * 32.0 / 90, abs=0.1)
    assert 500.0 < fresh["p99"] <= 1000.0, "30 of the 90 took 0.5-1 s"
