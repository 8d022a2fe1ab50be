"""`vlm4rec eval DATASET --online`: unit tests of the pieces free of a stack, and one run
against the whole local stack (`vlm4rec up`) on a tiny dataset the test writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from topics import Interaction, Rec, Recs
from vlm4rec.evaluation.dataset import load_dataset
from vlm4rec.evaluation.evaluate import bootstrap_resamples
from vlm4rec.evaluation.stream import select_targets

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def write_dataset(root: Path, users: int = 10, per_user: int = 6) -> Path:
    """Eight items (two per colour) with small PNGs; `users` users of `per_user` rows each,
    mostly within one colour, the last row a fresh item of that colour."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for colour, rgb in COLOURS.items():
        for n in range(2):
            Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{colour}-{n}.png")
            items.append((f"{colour}-{n}", f"{colour} thing {n}", f"a plain {colour} square", f"images/{colour}-{n}.png"))
    with open(root / "items.csv", "w") as file:
        file.write("item_id,title,text,image,category,created_at\n")
        for item_id, title, text, image in items:
            file.write(f"{item_id},{title},{text},{image},,\n")
    names = list(COLOURS)
    rows = []
    ts = 1_600_000_000
    for u in range(users):
        colour, other = names[u % 4], names[(u + 1) % 4]
        sequence = [f"{colour}-0", f"{other}-0", f"{colour}-0", f"{other}-1", f"{other}-0", f"{colour}-1"][:per_user]
        for item in sequence:
            ts += 60
            rows.append((f"u{u}", item, "click", ts))
    with open(root / "interactions.csv", "w") as file:
        file.write("user_id,item_id,event,value,ts\n")
        for user, item, event, t in rows:
            file.write(f"{user},{item},{event},,{t}\n")
    return root


def test_split_holds_back_exactly_the_offline_targets_and_keeps_their_items(tmp_path: Path) -> None:
    from vlm4rec.evaluation.online_eval import split

    dataset = load_dataset(write_dataset(tmp_path / "tiny"))
    plan = split(dataset)
    assert [t.row for t in plan.targets] == select_targets(plan.stream).tolist()
    assert len(plan.targets) == 10
    sent = [s.event for s in plan.events if isinstance(s.event, Interaction)]
    assert len(sent) == len(dataset.interactions) - len(plan.targets)
    assert sum(plan.expected.values()) == len(sent)
    # every published item is sent, including one whose first interaction is a target
    assert {s.event.item_id for s in plan.events if not isinstance(s.event, Interaction)} == set(plan.stream.item_ids)


def test_pushes_are_scored_like_offline_ranks(tmp_path: Path) -> None:
    from vlm4rec.evaluation.online_eval import split
    from vlm4rec.evaluation.online_scoring import agreement, score_pushes

    dataset = load_dataset(write_dataset(tmp_path / "tiny"))
    plan = split(dataset)
    first, second = plan.targets[0], plan.targets[1]
    ids, users = plan.stream.item_ids, plan.stream.user_ids
    pushes = {
        users[first.user]: Recs(user_id=users[first.user], items=[Rec(item_id="blue-1", score=1.0), Rec(item_id=ids[first.item], score=0.5)],
                                trigger="interaction", model="m", generated_at=1.0),
        users[second.user]: Recs(user_id=users[second.user], items=[Rec(item_id="nope", score=1.0)], trigger="fresh_item", model="m", generated_at=1.0),
    }
    score = score_pushes(plan.stream, plan.targets, pushes)
    assert score.ranks[0] == 2 and score.ranks[1] == 0 and all(r == 0 for r in score.ranks[2:])
    assert score.pushed == 2 and score.triggers == {"interaction": 1, "fresh_item": 1}
    assert score.unpublished_share == pytest.approx(1 / 3)
    resamples = bootstrap_resamples(len(plan.targets))
    summary = {"HR@10": 0.1, "HR@10_ci": [0.0, 0.3]}
    same = agreement(score.ranks, summary, {"x": score.ranks}, {"x": summary}, resamples)["x"]
    assert same["agree"] and same["difference"] == 0 and same["difference_ci"] == [0.0, 0.0]
    never = agreement([1] * 10, {"HR@10": 1.0, "HR@10_ci": [1.0, 1.0]}, {"x": [0] * 10}, {"x": summary}, resamples)["x"]
    assert not never["agree"] and never["difference"] == 1.0 and not never["online_in_offline_ci"]


def test_online_refuses_a_dataset_outside_the_image_roots(tmp_path: Path) -> None:
    from vlm4rec.evaluation.online_eval import OnlineError, check_file_roots
    from vlm4rec.settings import Settings

    dataset = load_dataset(write_dataset(tmp_path / "tiny"))
    with pytest.raises(OnlineError, match="VLM4REC_IMAGE_FILE_ROOTS"):
        check_file_roots(Settings(image_file_roots=[tmp_path / "elsewhere"]), dataset)
    check_file_roots(Settings(image_file_roots=[tmp_path]), dataset)


@pytest.mark.integration
def test_online_eval_scores_the_pushes_of_the_running_stack(tmp_path: Path) -> None:
    from conftest import REPO, stack_env, start_stack

    root = write_dataset(tmp_path / "tiny").resolve()
    variants = [{"name": "wide", "share": 0.5}, {"name": "narrow", "share": 0.5, "tail_slots": 0, "content_k": 5}]
    env = stack_env(tmp_path / "stack", VLM4REC_IMAGE_FILE_ROOTS=json.dumps([str(root)]), VLM4REC_WORKER_BATCH_MS="50",
                    VLM4REC_RANK_VARIANTS=json.dumps(variants))
    stack = start_stack(tmp_path / "stack", [], env=env, timeout_s=180)
    try:
        out = tmp_path / "online.json"
        result = subprocess.run(
            [sys.executable, "-m", "vlm4rec", "eval", str(root), "--online", "--out", str(out)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=240,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + stack.log_path.read_text()[-2000:]
        report = json.loads(out.read_text())
        assert report["mode"] == "online" and report["targets"] == 10
        for summary in report["methods"].values():
            assert 0.0 <= summary["HR@10"] <= 1.0 and 0.0 <= summary["HR@20"] <= 1.0
        assert report["online"]["targets_with_push"] == 10, report["online"]
        assert report["online"]["quiescence"]["reason"] == "caught up"
        assert report["online"]["top10_not_in_catalogue"] == 0.0
        from vlm4rec.settings import Settings

        strategy = Settings.model_fields["embed_strategy"].default  # the stack's item space
        assert set(report["agreement"]["methods"]) == {"popularity", strategy, "default"}
        assert all(isinstance(a["agree"], bool) for a in report["agreement"]["methods"].values())
        assert out.with_suffix(".md").read_text().count("agree") >= 1
        # the two ranking variants, each scored online and offline on its own users' targets
        assert set(report["by_variant"]) == {"wide", "narrow"}
        assert sum(v["targets"] for v in report["by_variant"].values()) == 10
        for v in report["by_variant"].values():
            if v["targets"]:
                assert 0.0 <= v["online"]["HR@10"] <= 1.0 and 0.0 <= v["offline"]["HR@10"] <= 1.0
        assert "Per ranking variant" in out.with_suffix(".md").read_text()
        # a second run on the same stack is refused: the rows would be applied twice
        again = subprocess.run(
            [sys.executable, "-m", "vlm4rec", "eval", str(root), "--online", "--out", str(tmp_path / "again.json")],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert again.returncode != 0 and "fresh stack" in again.stderr
    finally:
        stack.stop()
