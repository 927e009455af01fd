"""Continual-learning scenarios: a sequence of tasks, each with its train and test images.

One `Scenario` type serves both protocols (docs/experiments.md, Protocols):

- "cil" (class-incremental): one dataset, classes split into tasks following a class order. Labels are
  remapped to the position of the class in the order, so after task i the seen classes are exactly the
  labels 0..seen_classes(i)-1 and a classifier over `classnames[:seen_classes(i)]` can be indexed by the
  label directly. Task t's samples carry labels in `task_classes(t)`; subtract `label_offset` for the
  index into the task's own `classnames`.
- "mtcl" (multi-domain task-incremental): one dataset per task, labels 0..n-1 of that dataset
  (`label_offset` = 0), built in `mtcl.py`.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import yaml

from mozo.seeds import mix_seed

from .base import LabelledImages
from .readers import read_dataset

PROTOCOLS = ("cil", "mtcl")


# ----------------------------------------------------------------------------------------- class orders
def default_class_orders_path() -> Path:
    """The packaged copy of the shared class orders (mozo/configs/class_orders.yaml)."""
    return Path(str(resources.files("mozo").joinpath("configs/class_orders.yaml")))


def load_class_orders(path: Optional[Path | str] = None) -> dict[str, list[int]]:
    """Class orders by dataset key ("cifar100", "tinyimagenet"), each a permutation of 0..n-1.

    The default is the packaged copy of the published orders (DyTox / MoE-Adapters4CL); pass `path` to use
    another YAML file of the same shape ({key: [int, ...]}).
    """
    path = Path(path) if path is not None else default_class_orders_path()
    if not path.is_file():
        raise FileNotFoundError(f"class orders file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of dataset key -> list of class indices")
    orders: dict[str, list[int]] = {}
    for key, order in data.items():
        if not isinstance(order, list) or not all(isinstance(c, int) for c in order):
            raise ValueError(f"{path}: order {key!r} must be a list of integers")
        _check_permutation(order, len(order), f"{path}: order {key!r}")
        orders[str(key)] = list(order)
    return orders


def _check_permutation(order: Sequence[int], n: int, what: str) -> None:
    if len(order) != n:
        raise ValueError(f"{what} has {len(order)} entries but the dataset has {n} classes")
    if sorted(order) != list(range(n)):
        dup = sorted(c for c, count in Counter(order).items() if count > 1)
        missing = sorted(set(range(n)) - set(order))
        raise ValueError(f"{what} is not a permutation of 0..{n - 1}: duplicates {dup[:10]}, missing {missing[:10]}")


# ------------------------------------------------------------------------------------- tasks, scenarios
@dataclass
class Task:
    """One step of a scenario.

    Attributes:
        name: task name (written to results.json).
        train, test: this task's images. Their labels index `Scenario.classnames` for cil (global
            positions in the class order) and this task's `classnames` for mtcl.
        classnames: the names this task's logits cover at training time (cil: the current task's classes,
            in label order, so `label - label_offset` indexes them; mtcl: the dataset's classes).
        label_offset: first label of this task (cil); 0 for mtcl.
        eval_classnames: names the classifier covers when evaluating right after this task: cil, all
            classes seen so far (labels 0..label_offset+len(classnames)-1); mtcl, the dataset's classes
            (the default when not given).
    """

    name: str
    train: LabelledImages
    test: LabelledImages
    classnames: list[str]
    label_offset: int = 0
    eval_classnames: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if self.eval_classnames is None:
            self.eval_classnames = list(self.classnames)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def labels(self) -> range:
        """The labels this task's samples carry."""
        return range(self.label_offset, self.label_offset + len(self.classnames))


@dataclass
class Scenario:
    """A sequence of tasks under one protocol ("cil" or "mtcl").

    `classnames` (cil) holds every class in class-order position; `meta` records how the scenario was
    built (dataset, order, increments, few-shot, seed) for results.json.
    """

    protocol: str
    tasks: list[Task]
    name: str = ""
    classnames: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.tasks:
            raise ValueError(f"scenario {self.name!r} has no tasks")

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def task_test_sizes(self) -> list[int]:
        return [len(t.test) for t in self.tasks]

    def _check_task(self, i: int) -> int:
        if not -len(self.tasks) <= i < len(self.tasks):
            raise IndexError(f"task {i} out of range: scenario {self.name!r} has {len(self.tasks)} tasks")
        return i % len(self.tasks)

    def seen_classes(self, i: int) -> int:
        """cil: number of classes seen after task i (= labels 0..seen_classes(i)-1)."""
        if self.protocol != "cil":
            raise ValueError("seen_classes is defined for the class-incremental protocol only")
        task = self.tasks[self._check_task(i)]
        return task.label_offset + task.num_classes

    def task_classes(self, t: int) -> range:
        """The labels carried by task t's samples (cil: its slice of the order; mtcl: 0..n_t-1)."""
        return self.tasks[self._check_task(t)].labels

    def eval_classnames(self, after_task: int, task: Optional[int] = None) -> list[str]:
        """Class names of the classifier used to evaluate `task`'s test set after training `after_task`.

        cil: all classes seen after `after_task` (the test labels index this list directly; `task` is
        irrelevant). mtcl: task identity is known, so the classes of `task` (default `after_task`).
        """
        if self.protocol == "cil":
            return self.classnames[: self.seen_classes(after_task)]
        return list(self.tasks[self._check_task(after_task if task is None else task)].classnames)


# ------------------------------------------------------------------------------------------- few-shot
def few_shot_indices(labels: np.ndarray, k: int, seed: int = 0, salt: str = "") -> np.ndarray:
    """Indices (sorted) keeping k samples per class, the same on every machine.

    Within each class, samples are ranked by mix_seed(seed, salt, label, index) (mozo/seeds.py) and the first k kept:
    a function of the seed and the reader's (sorted) listing only, not of an RNG library's stream. A
    class with fewer than k samples keeps them all (with a warning).
    """
    if k <= 0:
        raise ValueError(f"few_shot must be a positive number of images per class, got {k}")
    labels = np.asarray(labels)
    keep: list[int] = []
    short: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            short.append(int(c))
        ranked = sorted(idx.tolist(), key=lambda i: (mix_seed(seed, salt, int(c), i), i))
        keep += ranked[:k]
    if short:
        warnings.warn(f"few-shot {k}: classes {short[:10]} have fewer than {k} training images; kept all of theirs")
    return np.asarray(sorted(keep), dtype=np.int64)


# -------------------------------------------------------------------------------- class-incremental
def _remap(images: LabelledImages, position: np.ndarray, classnames: list[str], extra: dict) -> LabelledImages:
    return LabelledImages(images.sources, position[images.labels], classnames, images.name, {**images.meta, **extra})


def class_incremental(
    train: LabelledImages,
    test: LabelledImages,
    order: Optional[Sequence[int]],
    initial_increment: int,
    increment: int,
    few_shot: Optional[int] = None,
    seed: int = 0,
    dataset_name: str = "",
) -> Scenario:
    """Split a dataset into class-incremental tasks.

    Labels become positions in `order` (order[p] = original label of new label p; `None` = the dataset's
    own order). Task 0 holds new labels [0, initial_increment), task t>0 the next `increment` labels; each
    task's train and test keep only its classes. `initial_increment` 0 or None means `increment`.
    `few_shot=k` keeps k training images per class (seeded by `seed`, see `few_shot_indices`); test sets
    are never reduced.
    """
    n = len(train.classnames)
    if list(test.classnames) != list(train.classnames):
        raise ValueError("train and test must share the same class list (same reader call)")
    order = list(range(n)) if order is None else [int(c) for c in order]
    dataset_name = dataset_name or train.name
    _check_permutation(order, n, f"class order for {dataset_name!r}")
    initial = increment if not initial_increment else int(initial_increment)
    if increment <= 0 or initial <= 0:
        raise ValueError(f"increments must be positive, got initial_increment={initial_increment}, "
                         f"increment={increment}")
    if initial > n or (n - initial) % increment:
        raise ValueError(f"initial_increment {initial} + k * increment {increment} must cover exactly the {n} classes "
                         f"of {dataset_name!r} ({n - initial} classes remain after the first task)")

    position = np.empty(n, dtype=np.int64)
    position[np.asarray(order)] = np.arange(n)
    classnames = [train.classnames[c] for c in order]
    extra = {"class_order": order}
    train_all = _remap(train, position, classnames, extra)
    test_all = _remap(test, position, classnames, extra)
    if few_shot:
        keep = few_shot_indices(train.labels, few_shot, seed, salt=dataset_name)
        train_all = train_all.subset(keep)

    bounds = [0, initial] + [initial + increment * (k + 1) for k in range((n - initial) // increment)]
    tasks = []
    for t, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        tr = train_all.subset(np.flatnonzero((train_all.labels >= lo) & (train_all.labels < hi)))
        te = test_all.subset(np.flatnonzero((test_all.labels >= lo) & (test_all.labels < hi)))
        tasks.append(Task(name=f"task{t}", train=tr, test=te, classnames=classnames[lo:hi], label_offset=lo,
                          eval_classnames=classnames[:hi]))
    meta = {"dataset": dataset_name, "class_order": order, "initial_increment": initial, "increment": increment,
            "few_shot": few_shot, "seed": seed}
    return Scenario(protocol="cil", tasks=tasks, name=dataset_name, classnames=classnames, meta=meta)


# ---------------------------------------------------------------------------------------- protocols
CIL_PROTOCOLS: dict[str, dict[str, Any]] = {
    "cifar100-10-10": dict(dataset="cifar100", num_classes=100, initial_increment=10, increment=10,
                           order_key="cifar100"),
    "cifar100-5-5": dict(dataset="cifar100", num_classes=100, initial_increment=5, increment=5, order_key="cifar100"),
    "cifar100-2-2": dict(dataset="cifar100", num_classes=100, initial_increment=2, increment=2, order_key="cifar100"),
    "tinyimagenet-100-5": dict(dataset="tinyimagenet", num_classes=200, initial_increment=100, increment=5,
                               order_key="tinyimagenet"),
    "tinyimagenet-100-10": dict(dataset="tinyimagenet", num_classes=200, initial_increment=100, increment=10,
                                order_key="tinyimagenet"),
    "tinyimagenet-100-20": dict(dataset="tinyimagenet", num_classes=200, initial_increment=100, increment=20,
                                order_key="tinyimagenet"),
    "tinyimagenet-inc10": dict(dataset="tinyimagenet", num_classes=200, initial_increment=10, increment=10,
                               order_key="tinyimagenet"),
    "tinyimagenet-inc20": dict(dataset="tinyimagenet", num_classes=200, initial_increment=20, increment=20,
                               order_key="tinyimagenet"),
    "imagenet-r-inc20": dict(dataset="imagenet-r", num_classes=200, initial_increment=20, increment=20, order_key=None),
}


def cil_protocol(name: str) -> dict[str, Any]:
    """Settings of a named class-incremental protocol: dataset, num_classes, initial_increment, increment, order_key.

    - cifar100-10-10 / -5-5 / -2-2: 100 classes in tasks of 10 / 5 / 2, shared CIFAR-100 order.
    - tinyimagenet-100-5 / -100-10 / -100-20: a first task of 100 classes, then tasks of 5 / 10 / 20.
    - tinyimagenet-inc10 / -inc20: the paper's TinyImageNet "Inc10" / "Inc20". Our interpretation (the
      paper does not spell it out): all 200 classes in equal tasks of 10 (20 tasks) / 20 (10 tasks),
      shared TinyImageNet order.
    - imagenet-r-inc20: 200 classes in 10 tasks of 20. No published class order exists for ImageNet-R,
      so it uses the natural order (sorted wnids; `order_key` None).
    """
    if name not in CIL_PROTOCOLS:
        raise KeyError(f"unknown class-incremental protocol {name!r}; known: {sorted(CIL_PROTOCOLS)}")
    return dict(CIL_PROTOCOLS[name])


def build_cil_scenario(
    protocol: str,
    data_root: Path | str,
    few_shot: Optional[int] = None,
    seed: int = 0,
    orders_path: Optional[Path | str] = None,
    reader_kwargs: Optional[dict[str, Any]] = None,
) -> Scenario:
    """Read the protocol's dataset under `data_root` and split it: the one call a run needs."""
    spec = cil_protocol(protocol)
    train, test = read_dataset(spec["dataset"], data_root, **(reader_kwargs or {}))
    if len(train.classnames) != spec["num_classes"]:
        raise ValueError(f"protocol {protocol} expects {spec['num_classes']} classes but the {spec['dataset']} "
                         f"dataset under {data_root} has {len(train.classnames)}; is the dataset complete?")
    order = load_class_orders(orders_path)[spec["order_key"]] if spec["order_key"] else None
    scenario = class_incremental(train, test, order, spec["initial_increment"], spec["increment"],
                                 few_shot=few_shot, seed=seed, dataset_name=spec["dataset"])
    scenario.name = protocol
    scenario.meta["protocol_name"] = protocol
    return scenario
