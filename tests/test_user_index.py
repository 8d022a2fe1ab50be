"""The in-memory index behind the fresh-item fan-out (streams/user_index.py)."""

from __future__ import annotations

import numpy as np

from streams.user_index import UserIndex, fanout_share


def unit(*v: float) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


def test_nearest_users_best_first_with_their_partitions() -> None:
    index = UserIndex()
    index.put("red-fan", unit(1, 0), 0)
    index.put("blue-fan", unit(0, 1), 1)
    index.put("purple-fan", unit(1, 1), 2)
    assert [(u, p) for u, _, p in index.nearest(unit(1, 0.1), 2)] == [("red-fan", 0), ("purple-fan", 2)]
    assert index.nearest(np.array([3.0, 0.0]), 1)[0][1] == 1.0  # cosine whatever the query's length


def test_a_moved_user_is_found_where_they_are_now_and_a_user_without_direction_leaves() -> None:
    index = UserIndex()
    index.put("u", unit(1, 0), 0)
    index.put("v", unit(0, 1), 0)
    index.put("u", unit(0, 1), 3)
    assert {u: p for u, _, p in index.nearest(unit(0, 1), 5)} == {"u": 3, "v": 0}
    index.put("u", None, 3)
    assert [u for u, _, _ in index.nearest(unit(1, 0), 5)] == ["v"], "never a removed user, even with n > users"


def test_revoked_partitions_leave_and_rows_are_reused() -> None:
    index = UserIndex()
    for n in range(3000):  # past the first capacity
        index.put(f"u{n}", unit(1, n % 7), n % 4)
    index.drop_partitions({1, 3})
    assert len(index) == 1500
    assert {p for _, _, p in index.nearest(unit(1, 3), 2000)} == {0, 2}
    index.put("new", unit(-1, 0), 1)
    assert index.nearest(unit(-1, 0), 1)[0][0] == "new"
    index.replace([("only", unit(0, 1), 2)])
    assert [u for u, _, _ in index.nearest(unit(1, 0), 10)] == ["only"]


def test_another_embedding_space_starts_afresh() -> None:
    index = UserIndex()
    index.put("u", unit(1, 0), 0)
    index.put("w", unit(1, 0, 0), 0)
    assert [u for u, _, _ in index.nearest(unit(1, 0, 0), 5)] == ["w"]
    assert index.nearest(unit(1, 0), 5) == []


def test_each_worker_pushes_its_share_of_the_fan_out() -> None:
    assert fanout_share(50, 4, 4) == 50
    assert fanout_share(50, 2, 4) == 25
    assert fanout_share(50, 1, 3) == 17
    assert fanout_share(1, 1, 4) == 1
    assert fanout_share(50, 0, 4) == 0 and fanout_share(0, 4, 4) == 0
