"""CZSL data: the standard layout's reader, the writer, the shapes and emoji builders, and the pretraining pools."""

from __future__ import annotations

import json
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leanfm.data import czsl, czsl_build
from leanfm.data.czsl import METADATA, SPLIT_DIR, CZSLData, Sample, load_images, pool_overlap, read_czsl, split_pairs
from leanfm.data.czsl_build import (
    build_emoji,
    build_shapes,
    cifar10_pool,
    emoji_pool,
    emoji_pool_entries,
    emoji_vocabulary,
    shapes_pool,
)
from leanfm.errors import LeanfmError

NOTO = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
needs_noto = pytest.mark.skipif(not NOTO.is_file(), reason="Debian fonts-noto-color-emoji is not installed")


def _write_public(root: Path, pairs: dict[str, list[str]], entries: list[dict], images: dict[str, Image.Image]) -> Path:
    """A folder in the exact public layout, written by hand (not by leanfm's writer)."""
    (root / SPLIT_DIR).mkdir(parents=True)
    for name, lines in pairs.items():
        (root / SPLIT_DIR / f"{name}_pairs.txt").write_text("\n".join(lines) + "\n")
    for relative, image in images.items():
        (root / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / relative)
    torch.save(entries, root / METADATA)
    return root


def _tiny(root: Path, **changes) -> Path:
    """3 attributes x 3 objects, pairs listed out of sorted order, an 'NA' entry and an entry of set 'NA'."""
    pairs = {"train": ["wet dog", "old cat", "big cat"], "val": ["big dog", "wet dog"], "test": ["old bird", "big cat"]}
    entries = [
        {"image": "wet_dog/0.png", "attr": "wet", "obj": "dog", "set": "train"},
        {"image": "old_cat/0.png", "attr": "old", "obj": "cat", "set": "train"},
        {"image": "x/na.png", "attr": "NA", "obj": "dog", "set": "train"},
        {"image": "x/noset.png", "attr": "old", "obj": "bird", "set": "NA"},
        {"image": "big_dog/0.png", "attr": "big", "obj": "dog", "set": "val"},
        {"image": "old_bird/0.png", "attr": "old", "obj": "bird", "set": "test"},
        {"image": "big_cat/1.png", "attr": "big", "obj": "cat", "set": "test"},
    ]
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    images = {e["image"]: red for e in entries if e["attr"] != "NA" and e["set"] != "NA"}
    images["old_bird/0.png"] = Image.new("RGBA", (6, 4), (0, 0, 255, 128))  # half-transparent blue, not square
    pairs.update(changes.pop("pairs", {}))
    return _write_public(root, pairs, changes.pop("entries", entries), images)


def test_a_folder_in_the_public_layout_reads_as_written(tmp_path):
    data = read_czsl(_tiny(tmp_path / "tiny"))
    assert data.attrs == ["big", "old", "wet"] and data.objs == ["bird", "cat", "dog"]
    assert data.pairs["train"] == [("wet", "dog"), ("old", "cat"), ("big", "cat")]  # file order
    assert data.seen_pairs == data.pairs["train"]
    assert data.unseen_pairs() == [("big", "dog"), ("old", "bird")]
    assert data.all_pairs()[:4] == [("big", "bird"), ("big", "cat"), ("big", "dog"), ("old", "bird")]
    assert len(data.all_pairs()) == 9
    assert [s.image for s in data.samples] == ["wet_dog/0.png", "old_cat/0.png", "big_dog/0.png", "old_bird/0.png",
                                               "big_cat/1.png"]  # the NA attribute and the NA set are skipped
    assert data.split("test")[0] == Sample("old_bird/0.png", "old", "bird", "test")
    images = load_images(data, data.samples, size=2)
    assert images.shape == (5, 3, 2, 2)
    assert torch.equal(images[0], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 2, 2))
    # 50%-transparent blue over white: (255 - 128 * 255 / 255, same, 255) = (127, 127, 255), after a 6x4 -> 3x2 resize
    # whose shorter side is 2 and a centre crop
    assert torch.allclose(images[3], torch.tensor([127, 127, 255])[:, None, None] / 255.0, atol=1 / 255)


@pytest.mark.parametrize(("damage", "message"), [
    ("no_folder", "CZSL folder .* does not exist"),
    ("no_val_file", "CZSL pair file .*val_pairs.txt' is missing"),
    ("no_metadata", "CZSL metadata .* is missing"),
    ("unknown_attribute", "image 'wet_dog/0.png' has attribute 'soggy', which no pair file lists"),
    ("wrong_split", "image 'wet_dog/0.png' is 'big dog', not a pair of train_pairs.txt"),
    ("empty", "has no train samples"),
    ("bad_line", "expected 'attr obj' \\(two words\\), found 'big fat cat'"),
    ("pickle", "cannot be loaded with weights_only=True"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, damage, message):
    root = _tiny(tmp_path / "tiny")
    entry = {"image": "wet_dog/0.png", "attr": "wet", "obj": "dog", "set": "train"}
    if damage == "no_folder":
        root = tmp_path / "absent"
    elif damage == "no_val_file":
        (root / SPLIT_DIR / "val_pairs.txt").unlink()
    elif damage == "no_metadata":
        (root / METADATA).unlink()
    elif damage in ("unknown_attribute", "wrong_split", "empty"):
        bad = {"unknown_attribute": [{**entry, "attr": "soggy"}], "empty": [],
               "wrong_split": [{**entry, "attr": "big", "obj": "dog"}]}[damage]  # a val pair, listed as train
        torch.save(bad, root / METADATA)
    elif damage == "bad_line":
        (root / SPLIT_DIR / "test_pairs.txt").write_text("old bird\nbig fat cat\n")
    else:
        (root / METADATA).write_bytes(pickle.dumps([Path("x")], protocol=2))  # arbitrary object: refused
    with pytest.raises(LeanfmError, match=message) as error:
        read_czsl(root)
    assert "\n" not in str(error.value)


def test_unknown_split_and_missing_image_are_one_line_errors(tmp_path):
    data = read_czsl(_tiny(tmp_path / "tiny"))
    with pytest.raises(LeanfmError, match="unknown CZSL split 'dev'; accepted: train, val, test"):
        data.split("dev")
    (data.root / "images" / "old_cat" / "0.png").unlink()
    with pytest.raises(LeanfmError, match=r"CZSL image .*old_cat/0\.png' is missing"):
        load_images(data, data.split("train"))


def test_split_pairs_sizes_and_coverage_are_as_designed():
    pairs = czsl_build.shapes_pairs()
    split = split_pairs(pairs, seed=3)
    seen = set(split["train"])
    val_unseen, test_unseen = set(split["val"]) - seen, set(split["test"]) - seen
    # 90 pairs: round(0.55 * 90) = 50 seen, round(0.2 * 90) = 18 val-unseen, 22 test-unseen, 25 seen in each eval file
    assert (len(seen), len(val_unseen), len(test_unseen)) == (50, 18, 22)
    assert len(split["val"]) == 18 + 25 and len(split["test"]) == 22 + 25
    assert seen | val_unseen | test_unseen == set(pairs) and not val_unseen & test_unseen
    assert {a for a, _ in seen} == {a for a, _ in pairs} and {o for _, o in seen} == {o for _, o in pairs}
    assert split["train"] == [p for p in pairs if p in seen]  # the order of the input
    assert split_pairs(pairs, seed=3) == split and split_pairs(pairs, seed=4) != split


def test_shapes_build_round_trip_and_determinism(tmp_path):
    first, second = build_shapes(tmp_path / "a", seed=1), build_shapes(tmp_path / "b", seed=1)
    data = read_czsl(first)
    assert len(data.attrs) == 18 and "striped-red" in data.attrs and data.objs == sorted(czsl_build.shapes.SHAPES)
    assert {a for a, _ in data.seen_pairs} == set(data.attrs) and {o for _, o in data.seen_pairs} == set(data.objs)
    assert len(data.unseen_pairs()) == 40 and all(p not in data.seen_pairs for p in data.unseen_pairs())
    assert [len(data.split(n)) for n in ("train", "val", "test")] == [50 * 16, 43 * 8, 47 * 8]
    test_pairs = {(s.attr, s.obj) for s in data.split("test")}
    assert test_pairs - set(data.seen_pairs) and test_pairs & set(data.seen_pairs)  # unseen and seen pairs in test
    images = load_images(data, data.split("val")[:5])
    assert images.shape == (5, 3, 32, 32) and 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)  # metadata and images


def test_shapes_pool_holds_only_seen_pairs(tmp_path):
    data = read_czsl(build_shapes(tmp_path / "s", seed=0, per_train_pair=1, per_eval_pair=1))
    images, captions = shapes_pool(seed=0, n_per_pair=2, exclude=data)
    assert images.shape == (2 * 50, 3, 32, 32) and len(captions) == 100
    named = {(f"{c.split()[2]}-{c.split()[3]}", c.split()[4]) for c in captions}
    assert named == set(data.seen_pairs)
    assert pool_overlap(captions, data) == []
    attr, obj = data.unseen_pairs()[0]
    planted = f"a small {attr.replace('-', ' ')} {obj}"
    assert pool_overlap([*captions, planted], data) == [planted]  # the check can fail


def test_pool_overlap_reads_hyphens_and_underscores_as_whole_phrases():
    data = CZSLData(Path("."), ["medium", "medium-light"], ["thumbs_up"],
                    {"train": [("medium-light", "thumbs_up")], "val": [("medium", "thumbs_up")], "test": []}, [])
    assert pool_overlap(["thumbs up medium-light skin tone", "thumbs down medium skin tone"], data) == []
    assert pool_overlap(["thumbs up medium skin tone"], data) == ["thumbs up medium skin tone"]


def test_cifar10_pool_reads_folder_and_tar_extracting_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANFM_HOME", str(tmp_path / "home"))
    source = tmp_path / "src"
    for split in ("train", "test"):
        for index, name in enumerate(("cat", "dog")):
            (source / "cifar10-jpeg" / split / name).mkdir(parents=True)
            for n in range(3):
                image = Image.new("RGB", (32, 32), (40 * index + n, 0, 0))
                image.save(source / "cifar10-jpeg" / split / name / f"{n}.jpg")
    tar_path = tmp_path / "ro" / "cifar10-jpeg.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as archive:
        archive.add(source / "cifar10-jpeg", arcname="cifar10-jpeg")
    images, captions = cifar10_pool(tar_path, per_class=2, seed=0)
    assert images.shape == (4, 3, 32, 32)
    assert captions == ["a photo of a cat"] * 2 + ["a photo of a dog"] * 2
    assert (tmp_path / "home" / "cifar10" / "cifar10-jpeg" / "train" / "cat").is_dir()
    assert sorted(p.name for p in tar_path.parent.iterdir()) == ["cifar10-jpeg.tar"]  # nothing beside the tar
    assert torch.equal(cifar10_pool(source, per_class=2, seed=0)[0], images)
    with pytest.raises(LeanfmError, match="class 'cat' has 3 train images; asked for 5"):
        cifar10_pool(source, per_class=5)


def test_emoji_vocabulary_maps_names_to_the_right_sequences():
    vocabulary = emoji_vocabulary()
    assert len(vocabulary) == 15 * 5 + 15 * 7 and len({o for _, o in vocabulary}) == 30
    assert vocabulary[("medium", "thumbs_up")] == "\U0001f44d\U0001f3fd"
    assert vocabulary[("dark", "teacher")] == "\U0001f9d1\U0001f3ff\u200d\U0001f3eb"  # the gender-neutral person
    assert vocabulary[("woman", "teacher")] == "\U0001f469\u200d\U0001f3eb"
    assert ("man", "thumbs_up") not in vocabulary  # infeasible in the open world
    assert sorted({o for _, o in emoji_vocabulary(max_objects=3)}) == ["teacher", "thumbs_down", "thumbs_up"]


@needs_noto
def test_emoji_seen_pairs_are_evaluated_in_another_style_than_they_train_in(tmp_path):
    root = build_emoji(tmp_path / "e", seed=0, max_objects=4, per_train_pair=2, per_eval_pair=2)
    data = read_czsl(root)
    assert set(data.attrs) == {*czsl_build.TONES, "man", "woman"}
    assert {a for a, _ in data.seen_pairs} == set(data.attrs) and {o for _, o in data.seen_pairs} == set(data.objs)
    styles = json.loads((root / "build.json").read_text())["styles"]
    if len(styles) < 2:
        pytest.skip(f"only the {styles} style is available (npm emoji-datasource-twitter could not be fetched)")

    def style(sample: Sample) -> str:
        return Path(sample.image).name.split("_")[1]

    trained = {}
    for sample in data.split("train"):
        assert trained.setdefault((sample.attr, sample.obj), style(sample)) == style(sample)  # one style per pair
    assert set(trained.values()) == {"noto", "twitter"}
    for sample in data.split("val") + data.split("test"):
        pair = (sample.attr, sample.obj)
        assert pair not in trained or style(sample) != trained[pair]
    unseen = [s for s in data.split("test") if (s.attr, s.obj) not in trained]
    assert {style(s) for s in unseen} == {"noto", "twitter"}


@needs_noto
def test_emoji_pool_holds_no_czsl_emoji(tmp_path):
    vocabulary = emoji_vocabulary()
    objs = sorted({o for _, o in vocabulary})
    data = CZSLData(Path("."), sorted({a for a, _ in vocabulary}), objs, {"train": [], "val": [], "test": []}, [])
    entries = emoji_pool_entries(data)
    assert len(entries) >= 1000
    names = czsl_build._cldr_names()
    banned = set(vocabulary.values()) | {names[n] for n in czsl_build.GESTURES + czsl_build.ROLES}
    banned |= {names[f"{g}_{r}"] for g in ("man", "woman") for r in czsl_build.ROLES}
    points = [{ord(c) for c in text if c != "\ufe0f"} for text, _, _ in entries]
    assert not {text for text, _, _ in entries} & banned
    assert not any(p & {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF, 0x20E3} for p in points)
    assert "grinning face" in {caption for _, caption, _ in entries}
    data.pairs["val"] = list(vocabulary)  # every CZSL pair counts as unseen here
    assert pool_overlap([caption for _, caption, _ in entries], data) == []
    images, captions = emoji_pool(seed=0, n_per_emoji=2, exclude=data, limit=5)
    assert images.shape == (10, 3, 32, 32) and len(set(captions)) == 5 and captions[0] == captions[1]


@needs_noto
def test_emoji_builds_with_noto_alone_when_npm_is_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LEANFM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("leanfm.data.npm.shutil.which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="leanfm.data.czsl"):
        root = build_emoji(tmp_path / "e", seed=1, max_objects=2, per_train_pair=1, per_eval_pair=1)
    assert json.loads((root / "build.json").read_text())["styles"] == ["noto"]
    assert "emoji style 'twitter' is not available (cannot fetch npm package" in caplog.text
    assert "only the 'noto' emoji style is available" in caplog.text
    image = np.asarray(Image.open(root / "images" / read_czsl(root).samples[0].image))
    assert image.shape == (32, 32, 3)


def test_pretraining_pool_joins_sources_and_refuses_a_pool_naming_an_unseen_pair(tmp_path):
    shapes_data = read_czsl(build_shapes(tmp_path / "shapes", seed=0, per_train_pair=1, per_eval_pair=1))
    images, captions, info = czsl_build.pretraining_pool(["shapes"], [shapes_data], per_pair=2, seed=0)
    assert info == {"shapes": 2 * len(shapes_data.seen_pairs)} and images.shape == (len(captions), 3, 32, 32)
    assert czsl.pool_overlap(captions, shapes_data) == []
    other = read_czsl(build_shapes(tmp_path / "other", seed=1, per_train_pair=1, per_eval_pair=1))
    with pytest.raises(LeanfmError, match="val/test-only pair") as caught:  # seed 1's unseen pairs are seed 0's seen
        czsl_build.pretraining_pool(["shapes"], [shapes_data, other], per_pair=1, seed=0)
    assert "\n" not in str(caught.value)
    with pytest.raises(LeanfmError, match="needs its CZSL dataset"):
        czsl_build.pretraining_pool(["emoji"], [shapes_data])
    with pytest.raises(LeanfmError, match="accepted: emoji, shapes, cifar10"):
        czsl_build.pretraining_pool(["imagenet"], [shapes_data])
