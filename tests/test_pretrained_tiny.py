"""The shipped tiny CLIP (src/mozo/assets/tiny-clip) and the demo stream built on it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mozo.backbone.clip import SHIPPED_TINY, load_backbone
from mozo.demo import pretrain as P
from mozo.demo import stream as S

TOLERANCE = 2.0  # accuracy points: float differences across CPUs / library versions


@pytest.fixture(scope="module")
def made_by() -> dict:
    return json.loads((SHIPPED_TINY / "made_by.json").read_text())


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_backbone("mozo-tiny")


def test_shipped_files_are_small_and_complete():
    names = {p.name for p in SHIPPED_TINY.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "preprocessor_config.json", "made_by.json"} <= names
    size = sum(p.stat().st_size for p in SHIPPED_TINY.iterdir())
    assert size < 8 * 2**20, f"shipped model is {size / 2**20:.1f} MB"


def test_shortcut_and_path_load_the_same_model(shipped):
    bb = load_backbone(str(SHIPPED_TINY))
    assert bb.image_size == S.IMAGE_SIZE == shipped.image_size
    assert bb.context_length == P.CONTEXT_LENGTH
    assert all(not p.requires_grad for p in shipped.model.parameters())
    for (n, a), (_, b) in zip(shipped.model.state_dict().items(), bb.model.state_dict().items()):
        assert torch.equal(a, b), n
    # every class name of the stream is whole words of the vocabulary (no byte fallback)
    for name in S.DEMO_CLASSNAMES:
        ids = shipped.tokenizer(name, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(name.split()), name


def test_recorded_zero_shot_accuracy_is_reproduced(shipped, made_by):
    recorded = made_by["zero_shot"]["accuracy_percent"]
    assert made_by["zero_shot"]["prompt"] == P.TEMPLATE
    measured = P.zero_shot_report(shipped.model, shipped.tokenizer, shipped.mean, shipped.std, demo=False)
    for group in ("shapes_held_in", "shapes_held_out", "shapes_held_out_among_held_out", "digits_held_in"):
        assert abs(measured[group]["accuracy"] - recorded[group]["accuracy"]) <= TOLERANCE, (group, measured[group], recorded[group])
    # the numbers mean something: held-out pairs well above chance, held-in high
    ho = measured["shapes_held_out"]
    assert ho["accuracy"] > 10 * ho["chance"], ho
    assert measured["shapes_held_in"]["accuracy"] > 70
    assert measured["digits_held_in"]["accuracy"] > 70


def test_demo_stream_zero_shot_is_above_chance(shipped, made_by):
    sc = S.build_demo_scenario(seed=0)
    images = np.concatenate([t.test.sources for t in sc.tasks])
    labels = np.concatenate([t.test.labels for t in sc.tasks])
    acc = P.zero_shot_accuracy(shipped.model, shipped.tokenizer, shipped.mean, shipped.std, images, labels, sc.classnames)
    recorded = made_by["zero_shot"]["accuracy_percent"]["demo_stream_all_classes"]
    assert abs(acc - recorded["accuracy"]) <= TOLERANCE
    assert acc > 3 * 100 / len(sc.classnames)
    # the never-seen digits are not solved zero-shot: there is something to learn
    assert made_by["zero_shot"]["accuracy_percent"]["demo_task:digits 5-9"]["accuracy"] < 50


def test_demo_stream_shape():
    sc = S.build_demo_scenario(seed=0)
    assert sc.protocol == "cil" and len(sc) >= 4
    assert sc.classnames == list(S.DEMO_CLASSNAMES)
    seen: set[str] = set()
    for t, task in enumerate(sc.tasks):
        assert not seen & set(task.classnames), "tasks must have disjoint classes"
        seen |= set(task.classnames)
        assert task.classnames == sc.classnames[task.label_offset:task.label_offset + task.num_classes]
        for part in (task.train, task.test):
            assert isinstance(part.sources, np.ndarray) and part.sources.dtype == np.uint8
            assert part.sources.shape[1:] == (S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
            assert set(np.unique(part.labels)) == set(task.labels)
        assert task.eval_classnames == sc.eval_classnames(t)
    # held-out classes are really held out of pretraining
    held_out_names = {S.shape_classname(c, s) for c, s in S.HELD_OUT_COMBOS} | {S.digit_classname(d) for d in S.HELD_OUT_DIGITS}
    assert held_out_names & seen
    for c, s in S.HELD_IN_COMBOS:
        assert S.shape_classname(c, s) not in held_out_names


def test_demo_stream_is_seeded_and_split_disjoint():
    a = S.build_demo_scenario(seed=3, train_per_class=5, test_per_class=4)
    b = S.build_demo_scenario(seed=3, train_per_class=5, test_per_class=4)
    c = S.build_demo_scenario(seed=4, train_per_class=5, test_per_class=4)
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        assert np.array_equal(ta.train.sources, tb.train.sources) and np.array_equal(ta.test.labels, tb.test.labels)
        assert not np.array_equal(ta.train.sources, tc.train.sources)
    split = S.digit_split()
    assert not set(split["pretrain"]) & set(split["train"])
    assert not set(split["pretrain"]) & set(split["test"])
    assert not set(split["train"]) & set(split["test"])
