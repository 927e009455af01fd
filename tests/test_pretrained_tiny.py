"""The shipped tiny CLIP (src/mozo/assets/tiny-clip) and the demo stream built on it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mozo.backbone.clip import SHIPPED_TINY, load_backbone
from mozo.demo import pretrain as P
from mozo.data import demo_stream as S

TOLERANCE = 2.0  # accuracy points: float differences across CPUs / library versions


@pytest.fixture(scope="module")
def made_by() -> dict:
    return json.loads((SHIPPED_TINY / "made_by.json").read_text())


@pytest.fixture(scope="module")
def scenario():
    return S.build_demo_scenario(seed=0)


@pytest.fixture(scope="module")
def shipped():
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
    for group, got in measured.items():
        assert abs(got["accuracy"] - recorded[group]["accuracy"]) <= TOLERANCE, (group, got, recorded[group])
    # the numbers mean something: held-in high, held-out pairs and handwriting well above chance
    assert measured["shapes_held_in"]["accuracy"] > 80
    assert measured["printed_digits"]["accuracy"] > 80
    assert measured["shapes_held_out"]["accuracy"] > 10 * measured["shapes_held_out"]["chance"]
    assert measured["handwritten_digits"]["accuracy"] > 2 * measured["handwritten_digits"]["chance"]


def test_demo_stream_zero_shot_is_above_chance(shipped, made_by, scenario):
    sc = scenario
    images = np.concatenate([t.test.sources for t in sc.tasks])
    labels = np.concatenate([t.test.labels for t in sc.tasks])
    acc = P.zero_shot_accuracy(shipped.model, shipped.tokenizer, shipped.mean, shipped.std, images, labels, sc.classnames)
    recorded = made_by["zero_shot"]["accuracy_percent"]["demo_stream_all_classes"]
    assert abs(acc - recorded["accuracy"]) <= TOLERANCE
    assert acc > 3 * recorded["chance"]
    # ... and leaves something to learn
    assert min(made_by["zero_shot"]["accuracy_percent"][f"demo_task:{t.name}"]["accuracy"] for t in sc.tasks) < 80


def test_demo_stream_shape(scenario):
    sc = scenario
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
    held_out_names = {S.shape_classname(c, s) for c, s in S.HELD_OUT_COMBOS}
    held_out_names |= {S.shape_classname(c, s) for c, s in S.ALL_COMBOS if s in S.HELD_OUT_SHAPES}
    assert held_out_names & seen
    assert not held_out_names & {S.shape_classname(c, s) for c, s in S.HELD_IN_COMBOS}
    assert set(S.HELD_OUT_SHAPES).isdisjoint(S.SEEN_SHAPES)


def test_demo_stream_is_seeded_and_split_disjoint():
    a = S.build_demo_scenario(seed=3, train_per_class=5, test_per_class=4)
    b = S.build_demo_scenario(seed=3, train_per_class=5, test_per_class=4)
    c = S.build_demo_scenario(seed=4, train_per_class=5, test_per_class=4)
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        assert np.array_equal(ta.train.sources, tb.train.sources) and np.array_equal(ta.test.labels, tb.test.labels)
        assert not np.array_equal(ta.train.sources, tc.train.sources)
    split = S.digit_split()
    assert not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + len(split["test"]) == 1797
    # the digits' test images never appear among the training images
    for task in a.tasks:
        train = {x.tobytes() for x in task.train.sources}
        assert not any(x.tobytes() in train for x in task.test.sources)


def test_word_tokenizer_keeps_every_word_whole(tmp_path):
    """Merges written for one word ("an", "and") must not split another ("orange", "cyan")."""
    from mozo.backbone.tokenizer import load_tokenizer, write_word_tokenizer

    words = P.vocabulary() + ["banana", "nan", "anagram", "rangers"]
    tok = load_tokenizer(write_word_tokenizer(words, tmp_path / "tok"))
    split = [w for w in words if len(tok(w, add_special_tokens=False)["input_ids"]) != 1]
    assert not split
    ids = tok("a photo of an orange digit seven.")["input_ids"]
    assert len(ids) == 2 + 7 + 1  # start, seven words, ".", end
