"""The evaluation protocol of EVAL.md on tiny hand-made datasets whose right answers are
computed by hand in the comments, plus one run on the real data (skipped without it)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fakes import FakeBackend
from streams.profile import Ranker
from vlm4rec.cli import main
from vlm4rec.evaluation.dataset import load_dataset
from vlm4rec.evaluation.embedcache import EmbeddingCache
from vlm4rec.evaluation.evaluate import bootstrap_resamples, evaluate, recommend, states, markdown_table, summarise
from vlm4rec.evaluation.methods import METHODS, co_occurrence
from vlm4rec.evaluation.stream import ContentIndex, build_stream, embed_content, lexicographic, select_targets, Target
from workers.embedder import Embedder

Row = tuple[str, str, float]  # user, item, ts


def make_dataset(
    folder: Path, rows: list[Row], items: list[str] | None = None, created: dict[str, float] | None = None
) -> Path:
    """A dataset folder: `items` (default: every item of `rows`) and `rows` in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    created = created or {}
    ids = items if items is not None else list(dict.fromkeys([i for _, i, _ in rows] + list(created)))
    with open(folder / "items.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["item_id", "title", "text", "image", "category", "created_at"])
        for item_id in ids:
            writer.writerow([item_id, f"title {item_id}", "", "", "", created.get(item_id, "")])
    with open(folder / "interactions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["user_id", "item_id", "ts", "event", "value"])
        for user, item, ts in rows:
            writer.writerow([user, item, ts, "rating", 4])
    return folder


def stream_of(tmp_path: Path, rows: list[Row], **kwargs: object):  # noqa: ANN201 - Stream
    return build_stream(load_dataset(make_dataset(tmp_path / "data", rows, **kwargs)))  # type: ignore[arg-type]


def content_of(stream, vectors: dict[str, list[float]]) -> dict[str, ContentIndex]:  # noqa: ANN001
    """A `text` index from hand-written vectors (missing items: zero rows)."""
    dim = len(next(iter(vectors.values())))
    matrix = np.array([vectors.get(i, [0.0] * dim) for i in stream.item_ids], dtype=np.float32)
    return {"text": ContentIndex(matrix)}


def tops(stream, method: str, content: dict[str, ContentIndex] | None = None, window_days: float = 7.0) -> list[list[str]]:  # noqa: ANN001
    ranker = Ranker(stream.item_ids)
    return [recommend(state, target, method, ranker) for state, target in states(stream, content or {}, window_days)]


def test_targets_need_two_earlier_rows_and_a_new_item_and_file_order_breaks_ts_ties(tmp_path: Path) -> None:
    stream = stream_of(
        tmp_path,
        [
            ("e", "i7", 8),  # e's last by ts, although first in the file
            ("a", "i1", 1), ("a", "i2", 2), ("a", "i3", 3),  # target i3
            ("b", "i1", 1), ("b", "i2", 2), ("b", "i1", 3),  # last is a repeat: no target
            ("c", "i1", 1), ("c", "i4", 5),  # one earlier row only: no target
            ("d", "i1", 4), ("d", "i2", 4), ("d", "i3", 4),  # same ts: file order, target i3
            ("e", "i5", 6), ("e", "i6", 7),
        ],
    )
    targets = [(stream.user_ids[stream.users[r]], stream.item_ids[stream.items[r]]) for r in select_targets(stream)]
    assert targets == [("a", "i3"), ("d", "i3"), ("e", "i7")]


def test_state_is_every_earlier_row_and_candidates_are_published_up_to_the_target_ts(tmp_path: Path) -> None:
    rows: list[Row] = [
        ("u1", "p", 10),
        ("u1", "q", 20),
        ("u5", "z", 25),
        ("u2", "s", 30),  # same ts, earlier in the file: in the state
        ("u1", "s", 30),  # the target (u1 has p, q before it)
        ("u4", "a", 30),  # same ts, later in the file: not in the state, but `a` is published
    ]
    stream = stream_of(tmp_path, rows, created={"c": 5.0, "b": 1000.0})
    # popularity just before the target: p 1, q 1 (u1's own: excluded), s 1, z 1, a 0, c 0;
    # b is published only at 1000. Ties by item_id: s before z, a before c.
    assert tops(stream, "popularity") == [["s", "z", "a", "c"]]
    report = evaluate(stream, ["popularity"], {})
    assert (report["targets"], report["cold_targets"]) == (1, 0)  # s was bought by u2 before
    metrics = report["methods"]["popularity"]
    assert metrics["HR@10"] == metrics["NDCG@10"] == 1.0
    assert metrics["coverage@10"] == pytest.approx(4 / 6)  # published by ts 30: p q z s a c
    assert metrics["HR@10_cold"] is None  # no cold target


def test_ties_are_broken_by_item_id_as_strings(tmp_path: Path) -> None:
    rows: list[Row] = [("v", "9", 1), ("w", "10", 2), ("u", "h1", 3), ("u", "h2", 4), ("u", "9", 5)]
    stream = stream_of(tmp_path, rows)
    # 9 and 10 both have one interaction; "10" < "9" as strings
    assert tops(stream, "popularity") == [["10", "9"]]
    report = evaluate(stream, ["popularity"], {})["methods"]["popularity"]
    assert report["NDCG@10"] == pytest.approx(1 / math.log2(3))


def test_recent_popularity_window_and_its_popularity_fallback(tmp_path: Path) -> None:
    day = 86400.0
    t = 10 * day
    rows: list[Row] = [
        ("x1", "old", 0), ("x2", "old", 1), ("x3", "old", 2),  # popular long ago
        ("x4", "r2", 3),  # r2's old interaction: counts for the fallback only
        ("x5", "edge", t - day),  # exactly W before the target: outside (ts > t - W)
        ("x6", "r1", t - 3600), ("x7", "r2", t - 3600),
        ("u", "h1", t - 60), ("u", "h2", t - 50), ("u", "r1", t),
    ]
    stream = stream_of(tmp_path, rows)
    # window counts: r1 1, r2 1, h1/h2 (excluded); old 0, edge 0. Fallback: r2 has 2 in all.
    assert tops(stream, "recent_popularity", window_days=1.0) == [["r2", "r1", "old", "edge"]]
    assert tops(stream, "popularity") == [["old", "r2", "edge", "r1"]]


def test_item_knn_scores_by_normalised_co_occurrence_then_popularity(tmp_path: Path) -> None:
    rows: list[Row] = [
        ("v1", "A", 1), ("v1", "B", 2),
        ("v2", "A", 3), ("v2", "C", 4),
        ("v3", "B", 5), ("v3", "C", 6), ("v3", "D", 7), ("v3", "B", 7.5),  # last is a repeat
        ("v4", "C", 8), ("v4", "C", 8.5),
        ("v5", "E", 9), ("v6", "E", 10), ("v7", "F", 11),
        ("u", "A", 12), ("u", "D", 13), ("u", "A", 14), ("u", "B", 15),  # the only target: B
    ]
    stream = stream_of(tmp_path, rows)
    state, target = next(states(stream, {}))
    scores = dict(zip(stream.item_ids, co_occurrence(state, target.user), strict=True))
    # distinct users so far: A 3 (v1 v2 u), B 2 (v1 v3), C 3 (v2 v3 v4), D 2 (v3 u); history {A, D}
    assert scores["B"] == pytest.approx(1 / math.sqrt(3 * 2) + 1 / math.sqrt(2 * 2))  # v1 with A, v3 with D
    assert scores["C"] == pytest.approx(1 / math.sqrt(3 * 3) + 1 / math.sqrt(2 * 3))  # v2 with A, v3 with D
    assert scores["E"] == scores["F"] == 0.0
    # E and F share no user with A or D: popularity (E 2, F 1) orders them
    assert tops(stream, "item_knn") == [["B", "C", "E", "F"]]
    assert tops(stream, "popularity") == [["C", "B", "E", "F"]]  # C 4 interactions, B 3


def test_lexicographic_orders_by_primary_then_fallback() -> None:
    combined = lexicographic(np.array([0.5, 0.5, 0.1, 0.7]), np.array([1.0, 2.0, 9.0, 0.0]))
    assert np.argsort(-combined, kind="stable").tolist() == [3, 1, 0, 2]


def test_content_profile_is_the_mean_of_distinct_history_items_and_reaches_fresh_items(tmp_path: Path) -> None:
    rows: list[Row] = [("u", "h1", 1), ("u", "h1", 2), ("u", "h2", 3), ("v", "c1", 4), ("u", "c2", 5)]
    stream = stream_of(tmp_path, rows)
    s3 = 1 / math.sqrt(3)
    content = content_of(stream, {"h1": [1, 0, 0], "h2": [0, 1, 0], "c1": [1, 0, 0], "c2": [s3, s3, s3]})
    # distinct mean (e1 + e2)/sqrt2: c2 0.816 > c1 0.707. Counting h1 twice would put c1 first.
    # c2's first interaction is the target itself: published at the target's ts, a candidate.
    assert tops(stream, "text", content) == [["c2", "c1"]]
    report = evaluate(stream, ["text", "popularity"], content)
    assert report["cold_targets"] == 1
    assert report["methods"]["text"]["HR@10_cold"] == report["methods"]["text"]["NDCG@10"] == 1.0
    assert report["methods"]["popularity"]["NDCG@10"] == pytest.approx(1 / math.log2(3))  # c1 (1) first


def test_identical_vectors_tie_exactly_and_fall_back_to_item_id(tmp_path: Path) -> None:
    rows: list[Row] = [("u", "h1", 1), ("u", "h2", 2), ("v", "b", 3), ("v", "a", 4), ("u", "x", 5)]
    stream = stream_of(tmp_path, rows)
    same = [0.6, 0.8, 0.0]
    content = content_of(stream, {"h1": [1, 0, 0], "h2": [0.6, 0.8, 0], "a": same, "b": same, "x": [0, 0, 1]})
    assert tops(stream, "text", content) == [["a", "b", "x"]]


def test_default_is_the_products_blend_over_its_semantic_source(tmp_path: Path) -> None:
    from vlm4rec.evaluation.methods import Blend
    from vlm4rec.evaluation.stream import DEFAULT_STRATEGY

    default = METHODS["default"]
    assert default.strategy == DEFAULT_STRATEGY and default.make is not None
    # a fresh, stateful scorer per walk (the ranker learns along the stream)
    stream = stream_of(tmp_path, [("u", "a", 1)])
    index = {DEFAULT_STRATEGY: ContentIndex(np.eye(len(stream.item_ids), dtype=np.float32))}
    assert isinstance(default.scorer(stream, index), Blend)


def test_bootstrap_is_fixed_and_shared_by_methods(tmp_path: Path) -> None:
    assert np.array_equal(bootstrap_resamples(7), bootstrap_resamples(7))
    assert bootstrap_resamples(7).shape == (1000, 7)
    resamples = bootstrap_resamples(4)
    targets = [Target(n, n, n, float(n), cold=False) for n in range(4)]
    assert summarise([1, 1, 1, 1], targets, set(), 10, resamples)["HR@10_ci"] == [1.0, 1.0]
    assert summarise([0, 0, 15, 0], targets, set(), 10, resamples)["HR@10_ci"] == [0.0, 0.0]  # 15 > 10
    mixed = summarise([1, 0, 3, 0], targets, set(), 10, resamples)
    low, high = mixed["HR@10_ci"]
    assert low <= mixed["HR@10"] == 0.5 <= high and low < high
    # two methods with the same hits get the same interval: one set of resamples for all
    stream = stream_of(tmp_path, [("u", "h1", 1), ("u", "h2", 2), ("u", "x", 3), ("w", "h1", 4), ("w", "h2", 5), ("w", "y", 6)])
    first = evaluate(stream, ["popularity", "recent_popularity"], {})
    assert first == evaluate(stream, ["popularity", "recent_popularity"], {})
    assert first["methods"]["popularity"]["HR@10_ci"] == first["methods"]["recent_popularity"]["HR@10_ci"]


def test_no_target_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no user has a target"):
        evaluate(stream_of(tmp_path, [("u", "a", 1), ("u", "b", 2)]), ["popularity"], {})


def test_embeddings_are_cached_and_strategies_share_model_passes(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "data", [("u", "a", 1), ("u", "b", 2), ("u", "c", 3)])
    (folder / "images").mkdir()
    for n, item_id in enumerate("ab"):
        Image.new("RGB", (4, 4), (40 * n, 0, 0)).save(folder / "images" / f"{item_id}.png")
    lines = (folder / "items.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",,,", ",,images/a.png,", 1)
    lines[2] = lines[2].replace(",,,", ",,images/b.png,", 1)
    (folder / "items.csv").write_text("\n".join(lines) + "\n")
    dataset = load_dataset(folder)
    stream = build_stream(dataset)
    cache = EmbeddingCache(tmp_path / "cache" / "vectors.sqlite")
    backend = FakeBackend()
    strategies = ["describe", "image", "text", "fused"]
    indexes, failed = embed_content(dataset, stream, strategies, backend, cache)
    # for 4 strategies, one image pass (describe + embed) and each distinct text once: the
    # `text` call only has a's and b's ("title c" is c's describe text too: it has no image)
    assert sorted(backend.calls) == [("describe", 2), ("embed_images", 2), ("embed_texts", 2), ("embed_texts", 3)]
    assert failed == {"c": "image: strategy 'image' needs an image: backend fake has no joint text-image space"}
    # the very vectors the worker's Embedder makes, one strategy at a time
    from workers.embedder import ItemContent
    from images.loader import ImageLimits, ImageLoader

    loader = ImageLoader(ImageLimits(file_roots=(folder,)))
    contents = [ItemContent(i.item_id, i.title, i.text, loader.load(i.image_url) if i.image_url else None) for i in dataset.items]
    for strategy in strategies:
        alone = Embedder(FakeBackend(), strategy).embed(contents)
        for item_id, vector in zip(alone.item_ids, alone.vectors, strict=True):
            assert np.allclose(indexes[strategy].vectors[stream.item_ids.index(item_id)], vector)
    assert not indexes["image"].vectors[stream.item_ids.index("c")].any()  # no image: zero row
    again = FakeBackend()
    second, _ = embed_content(dataset, stream, strategies, again, cache)
    assert again.calls == []  # everything from the cache
    assert all(np.array_equal(second[s].vectors, indexes[s].vectors) for s in strategies)


def test_eval_command_writes_json_table_and_chart(tmp_path: Path) -> None:
    folder = make_dataset(
        tmp_path / "data", [("u", "h1", 1), ("u", "h2", 2), ("v", "x", 3), ("u", "x", 4), ("w", "h1", 5), ("w", "x", 6), ("w", "y", 7)]
    )
    out = tmp_path / "out" / "report.json"
    env = {"VLM4REC_DATA_DIR": str(tmp_path / "state")}
    result = CliRunner().invoke(main, ["eval", str(folder), "--out", str(out), "--methods", "popularity,item_knn"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == {"dataset", "targets", "cold_targets", "later_targets", "default", "rank_settings", "methods"}
    assert report["rank_settings"] == {}, "the ranker as it ships"
    assert list(report["methods"]) == ["popularity", "item_knn"]
    assert set(report["methods"]["popularity"]) == {
        "HR@10", "NDCG@10", "HR@20", "NDCG@20", "coverage@10", "HR@10_ci", "HR@10_cold", "HR@10_later", "NDCG@10_later"
    }
    assert "| popularity |" in out.with_suffix(".md").read_text() and "| item_knn |" in result.output
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    tuned = CliRunner().invoke(main, ["eval", str(folder), "--out", str(out), "--methods", "default", "--partitions", "2"],
                               env={**env, "VLM4REC_RANK_SEQUENCE_STEPS": "3", "VLM4REC_RANK_TAIL_SLOTS": "0"})
    assert tuned.exit_code == 0, tuned.output
    tuned_report = json.loads(out.read_text())
    assert tuned_report["rank_settings"] == {"sequence_steps": 3, "tail_slots": 0}, "the stream processor's settings"
    assert tuned_report["partitioned"]["partitions"] == 2 and "HR@10" in tuned_report["partitioned"]
    assert "learns from its own partitions" in out.with_suffix(".md").read_text()
    shards = [CliRunner().invoke(main, ["eval", str(folder), "--out", str(tmp_path / f"s{n}.json"), "--methods", "popularity",
                                        "--user-shard", f"{n}/3"], env=env) for n in range(3)]
    assert shards[0].exit_code == 0, shards[0].output  # u and w (CRC32 mod 3): both targets
    assert json.loads((tmp_path / "s0.json").read_text())["user_shard"] == "0/3"
    assert all(s.exit_code == 1 and "no user has a target" in s.output for s in shards[1:]), "v alone, or nobody"
    for wrong in ("2/2", "x/3", "1"):
        refused = CliRunner().invoke(main, ["eval", str(folder), "--user-shard", wrong], env=env)
        assert refused.exit_code == 2 and "--user-shard" in refused.output
    bad = CliRunner().invoke(main, ["eval", str(folder), "--methods", "popularity,magic"], env=env)
    assert bad.exit_code != 0 and "magic" in bad.output
    online = CliRunner().invoke(main, ["eval", str(folder), "--online"], env=env)
    assert online.exit_code != 0
    assert "VLM4REC_IMAGE_FILE_ROOTS" in online.output  # --online checks the running stack can read the images


def test_real_data_quick_run(shared_data: Path, tmp_path: Path) -> None:
    """ml100k, first 100 users, the collaborative methods: runs, and the figures are sane."""
    out = tmp_path / "ml100k.json"
    result = CliRunner().invoke(
        main,
        ["eval", str(shared_data / "ml100k"), "--limit-users", "100", "--methods", "popularity,item_knn", "--out", str(out)],
        env={"VLM4REC_DATA_DIR": str(tmp_path / "state")},
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["dataset"] == "ml100k" and 50 < report["targets"] <= 100
    for metrics in report["methods"].values():
        low, high = metrics["HR@10_ci"]
        assert 0.0 <= low <= metrics["HR@10"] <= high <= 1.0
        assert metrics["HR@10"] <= metrics["HR@20"] and 0 < metrics["coverage@10"] <= 1


def test_bench_rank_times_the_products_ranker_after_streaming_a_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = [(f"u{rng.integers(30)}", f"i{rng.integers(60):02d}", 1_700_000_000.0 + 60 * n) for n in range(600)]
    folder = make_dataset(tmp_path / "data", rows)
    out = tmp_path / "rank.json"
    result = CliRunner().invoke(main, ["bench", "rank", str(folder), "--users", "8", "--rounds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["interactions"] == 600 and report["users_per_round"] == 8 and report["rounds"] == 2
    assert report["model_fits"] >= 1, "600 rows are enough for the blend's first fit"
    assert report["rank_ms_per_user"] > 0 and report["candidates_per_user"] > 10
    assert report["users_per_s_one_core"] == pytest.approx(1000 / report["rank_ms_per_user"], rel=0.01)
    assert report["serving_ms_per_user"] > 0, "the same rounds through the stream processor's path"


def test_later_visit_targets_come_more_than_an_hour_after_the_users_previous_interaction(tmp_path: Path) -> None:
    """EVAL.md: a target more than 3,600 s after the same user's previous interaction is a
    later visit; the metrics over them and their count are reported beside the others."""
    rows: list[Row] = [
        ("u", "h1", 0), ("u", "h2", 10), ("u", "x", 10 + 3600),  # exactly an hour: same visit
        ("v", "h1", 0), ("w", "h2", 5), ("v", "h2", 20), ("v", "x", 20 + 3601),  # later visit
        ("z", "h1", 0), ("z", "x", 7200), ("z", "h2", 7300), ("z", "y", 7400),  # previous is h2, 100 s before
    ]
    stream = stream_of(tmp_path, rows)
    later = {stream.user_ids[t.user]: t.later for _, t in states(stream, {})}
    assert later == {"u": False, "v": True, "z": False}
    report = evaluate(stream, ["popularity"], {})
    assert report["later_targets"] == 1
    metrics = report["methods"]["popularity"]
    hit_v = 1.0 if "x" in tops(stream, "popularity")[1][:10] else 0.0
    assert metrics["HR@10_later"] == hit_v
    assert "1 later visits" in markdown_table(report) and "HR@10 later" in markdown_table(report)


def no_signal_stream(tmp_path: Path, seed: int):  # noqa: ANN201 - (Stream, content)
    """Users pick items uniformly at random within two days, items are published at their
    first interaction (no created_at), and their vectors are random: nothing to learn. Over
    two days every touched item still has a decayed count, which is what made a never-touched
    one (the target) stand out."""
    rng = np.random.default_rng(seed)
    n_items, n_users, per_user, days = 3000, 400, 6, 2
    rows: list[Row] = []
    for u in range(n_users):
        for item in rng.choice(n_items, size=per_user, replace=False).tolist():
            rows.append((f"u{u}", f"i{item:03d}", float(rng.uniform(0, days * 86400))))
    rows.sort(key=lambda r: r[2])
    stream = stream_of(tmp_path / f"s{seed}", rows)
    vectors = rng.normal(size=(len(stream.item_ids), 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return stream, {"text": ContentIndex(vectors.astype(np.float32))}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_method_beats_chance_on_a_stream_without_signal(tmp_path: Path, seed: int) -> None:
    """The guard of the publication leak (issue 20): with nothing to learn, no method may find
    the target better than a random pick from the candidates would. A feature that tells a
    never-touched published item (the target itself, when items are published at their first
    interaction) from the rest would put `default` far above it."""
    stream, content = no_signal_stream(tmp_path, seed)
    report = evaluate(stream, ["popularity", "item_knn", "text", "default"], content)
    targets = report["targets"]
    # chance: 10 of the candidates published by then, less the user's 5 earlier items
    published = np.array([(stream.published_at <= t.ts).sum() - 5 for _, t in states(stream, {})])
    chance = float(np.mean(np.minimum(1.0, 10.0 / np.maximum(published, 1))))
    bound = chance + 1.96 * math.sqrt(chance * (1 - chance) / targets) + 1.0 / targets
    for name, metrics in report["methods"].items():
        assert metrics["HR@10"] <= bound, f"{name}: HR@10 {metrics['HR@10']:.3f} above chance {chance:.3f} (bound {bound:.3f})"


def test_partitioned_learning_ranks_every_target_by_its_users_partition_alone(tmp_path: Path) -> None:
    """`vlm4rec eval --partitions N`: the same targets, each ranked by a blend that learnt only
    from its user's partition. A partition that holds every user ranks as the whole."""
    from vlm4rec.evaluation.evaluate import walk
    from vlm4rec.evaluation.partitioned import partition_of, partitioned_ranks

    rng = np.random.default_rng(5)
    rows = [(f"u{u}", f"i{int(rng.integers(30))}", 1000 * u + 10 * s) for u in range(40) for s in range(5)]
    stream = build_stream(load_dataset(make_dataset(tmp_path / "data", rows)))
    indexes = {"text": ContentIndex(rng.normal(size=(len(stream.item_ids), 8)).astype(np.float32))}
    targets, whole = walk(stream, ["default"], indexes)
    one, _ = partitioned_ranks(stream, 1, indexes, walk, 30.0, None)
    assert [one[t.row] for t in targets] == whole["default"].ranks
    four, _ = partitioned_ranks(stream, 4, indexes, walk, 30.0, None)
    assert sorted(four) == sorted(t.row for t in targets), "every target, once"
    assert {partition_of(u, 4) for u in stream.user_ids} == {0, 1, 2, 3}


def test_user_shards_split_a_dataset_into_disjoint_streams_of_whole_users(tmp_path: Path) -> None:
    rows = [(f"u{n % 7}", f"i{n % 5}", n) for n in range(40)]
    dataset = load_dataset(make_dataset(tmp_path / "data", rows))
    parts = [dataset.user_shard(n, 3) for n in range(3)]
    assert sum(len(p.interactions) for p in parts) == len(dataset.interactions) == 40
    users = [{r.user_id for r in p.interactions} for p in parts]
    assert sum(len(u) for u in users) == 7 and set().union(*users) == {f"u{n}" for n in range(7)}
    assert all(p.items == dataset.items for p in parts), "every item kept: publication follows the shard's own stream"
    with pytest.raises(ValueError, match="shard"):
        dataset.user_shard(3, 3)
