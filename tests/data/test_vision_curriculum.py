"""The visual families: determinism (PNGs included), held-out disjointness, answers true to the drawn scene."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from k25.cli import main
from k25.data import (
    ALL_FAMILIES,
    FAMILIES,
    VISION_FAMILIES,
    check_images,
    check_record,
    generate,
    read_jsonl,
    score_answer,
    split_of,
    training_segments,
    write,
)
from k25.data.vision import CHART_BOX, CHART_MAX, COLOURS, READ_CELL, bar_centre, image_urls

N = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cur = generate(seed=11, n_per_family=N, families=["vision"], corpus_size=60)
    root = tmp_path_factory.mktemp("vision")
    write(cur, root)
    return cur, root


def records(cur, family=None):
    for fam, by_split in cur.records.items():
        for recs in by_split.values():
            yield from (r for r in recs if family in (None, fam))


def image_of(root, rec) -> Image.Image:
    (url,) = image_urls(rec["messages"])
    return Image.open(root / rec["family"] / url).convert("RGB")


def test_families_are_opt_in_and_grouped():
    assert not set(VISION_FAMILIES) & set(FAMILIES)  # the default curriculum stays text-only
    assert set(ALL_FAMILIES) == {*FAMILIES, *VISION_FAMILIES}
    cur = generate(seed=1, n_per_family=2, families=["arith_think", "vision"], corpus_size=40)
    assert list(cur.records) == ["arith_think", *VISION_FAMILIES]
    assert not any(p.startswith("arith") for p in cur.images)


def test_records_show_one_image_in_a_user_turn_and_are_valid(data):
    cur, root = data
    for fam in VISION_FAMILIES:
        assert (len(cur.records[fam]["train"]), len(cur.records[fam]["heldout"])) == (N, 4)
    modes = set()
    for rec in records(cur):
        assert check_record(rec) == [] and check_images(rec, root / rec["family"]) == []
        user = rec["messages"][0]
        assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["image_url", "text"]
        (url,) = image_urls(rec["messages"])
        data_bytes = (root / rec["family"] / url).read_bytes()
        assert url == f"images/{hashlib.sha256(data_bytes).hexdigest()[:20]}.png"  # named by content
        img = Image.open(root / rec["family"] / url)
        assert img.format == "PNG" and list(img.size) == rec["meta"]["size"] and max(img.size) <= 140  # small
        text = "".join(t for t, _ in training_segments(rec))
        assert text.count("<|media_pad|>") == 1
        assert not any(target and "<|media" in t for t, target in training_segments(rec))  # images are prompt only
        modes.add(rec["mode"])
        assert bool(rec["messages"][-1].get("reasoning_content")) == (rec["mode"] == "thinking")
        assert score_answer(rec, rec["messages"][-1]["content"]), rec["id"]
    assert modes == {"thinking", "instant"}
    assert {p.split("/")[0] for p in cur.images} == set(VISION_FAMILIES)


def test_same_seed_same_bytes_images_included(tmp_path):
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        write(generate(seed, 8, families=["vision"], corpus_size=40), tmp_path / name)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert sum(f.suffix == ".png" for f in files) >= 3 * 9
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for fam in VISION_FAMILIES:
        a, c = ((tmp_path / x / fam / "train.jsonl").read_bytes() for x in "ac")
        assert a != c


def test_heldout_is_disjoint_from_train(data):
    cur, _ = data
    keys = {"train": set(), "heldout": set()}
    images = {"train": set(), "heldout": set()}
    for rec in records(cur):
        assert split_of(rec["meta"]["key"]) == rec["split"]
        keys[rec["split"]].add(rec["meta"]["key"])
        images[rec["split"]].update(image_urls(rec["messages"]))
    assert not keys["train"] & keys["heldout"] and not images["train"] & images["heldout"]
    # a held-out number or word is never read in training, in any rendering
    texts = {s: {r["meta"]["text"].lower() for r in records(cur, "vision_read") if r["split"] == s} for s in keys}
    assert texts["heldout"] and not texts["train"] & texts["heldout"]


def test_counts_match_the_drawn_scene(data):
    cur, root = data
    for rec in records(cur, "vision_count"):
        target, scene = rec["meta"]["target"], rec["meta"]["scene"]
        wanted = [s for s in scene if target["shape"] in (None, s["shape"]) and target["colour"] in (None, s["colour"])]
        assert rec["answer"] == str(len(wanted)) and 1 <= len(wanted) <= 7
        cells = {(s["row"], s["col"]) for s in scene}
        assert len(cells) == len(scene)  # one shape per grid cell: no overlaps
        img = image_of(root, rec)
        for s in scene:  # every shape of the description is in the picture, in its colour
            assert img.getpixel((s["x"], s["y"])) == COLOURS[s["colour"]], (rec["id"], s)
        if rec["mode"] == "thinking":
            assert rec["messages"][-1]["reasoning_content"].endswith(f"That makes {len(wanted)}.")


def test_chart_answers_match_the_bar_heights_in_the_pixels(data):
    cur, root = data
    asks = set()
    for rec in records(cur, "vision_chart"):
        bars, ask = rec["meta"]["bars"], rec["meta"]["ask"]
        asks.add(ask)
        img = image_of(root, rec)
        bottom, top = CHART_BOX[3], CHART_BOX[2]
        unit = (bottom - top) / CHART_MAX
        for i, (label, value) in enumerate(bars.items()):
            x = bar_centre(i, len(bars))
            colour = img.getpixel((x, bottom - 1))
            y = bottom - 1
            while img.getpixel((x, y - 1)) == colour:
                y -= 1
            assert round((bottom - y) / unit) == value, (rec["id"], label)
        expected = {"tallest": max(bars, key=bars.get), "shortest": min(bars, key=bars.get)}.get(ask)
        assert rec["answer"] == (expected or str(bars[rec["meta"]["key"].split(":")[2]]))
        assert len(set(bars.values())) == len(bars) and not {"A", "I"} & set(bars)
    assert asks == {"tallest", "shortest", "value"}


def test_reading_answers_are_the_drawn_text(data):
    cur, root = data
    kinds = set()
    for rec in records(cur, "vision_read"):
        meta = rec["meta"]
        kinds.add(meta["kind"])
        assert rec["answer"] == meta["text"]
        assert rec["answer_type"] == ("number" if meta["kind"] == "number" else "text")
        if meta["kind"] == "number":
            assert meta["text"] == str(int(meta["text"])) and len(meta["text"]) <= 4
        img = image_of(root, rec).convert("L")
        lo, hi = img.getextrema()
        assert lo < 100 < hi  # dark ink on a light ground
        # a typewriter line: one 28-px cell (one LM position) per character, ink in every cell
        assert img.size == (READ_CELL * len(meta["text"]), READ_CELL), (rec["id"], img.size)
        for i in range(len(meta["text"])):
            cell = img.crop((i * READ_CELL, 0, (i + 1) * READ_CELL, READ_CELL))
            assert cell.getextrema()[0] < 100, (rec["id"], i)
    assert kinds == {"number", "word"}


def test_cli_generates_and_checks_images(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "generate", "--out", str(out), "--seed", "2", "--n-per-family", "4",
                 "--families", "vision_count,vision_chart"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["families"]["vision_count"]["train"]["images"] == 4
    assert main(["data", "check", str(out)]) == 0
    assert "0 problems" in capsys.readouterr().out
    rec = next(read_jsonl(out / "vision_chart" / "train.jsonl"))
    (out / "vision_chart" / image_urls(rec["messages"])[0]).write_bytes(b"not a png")
    first = next(read_jsonl(out / "vision_count" / "train.jsonl"))
    (out / "vision_count" / image_urls(first["messages"])[0]).unlink()
    assert main(["data", "check", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "not a readable image" in printed and "does not exist" in printed and "2 problems" in printed


def test_join_spells_reading_texts_and_shares_their_split():
    """``join`` (text only): the characters one by one in the question, the joined text as the answer,
    and the split of the same text in ``vision_read``, so a held-out picture's text is held out here too."""
    cur = generate(seed=2, n_per_family=60, n_heldout=20, families=["join", "vision_read"], corpus_size=40)
    read_split = {r["meta"]["key"]: r["split"] for r in records(cur, "vision_read")}
    kinds, shared = set(), 0
    for rec in records(cur, "join"):
        assert not check_record(rec), check_record(rec)
        text, kinds = rec["meta"]["text"], kinds | {rec["meta"]["kind"]}
        question, answer = rec["messages"][0]["content"], rec["messages"][-1]
        assert ", ".join(text) in question and text not in question.replace(", ".join(text), "")
        assert rec["answer"] == text and score_answer(rec, answer["content"])
        assert ("reasoning_content" in answer) == (rec["mode"] == "thinking")
        assert rec["split"] == split_of(rec["meta"]["key"])
        if rec["meta"]["key"] in read_split:
            shared += 1
            assert rec["split"] == read_split[rec["meta"]["key"]]
    assert kinds == {"number", "word"} and shared > 0
