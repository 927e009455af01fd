"""From a run configuration to a `Scenario`: which datasets, split how, under which protocol."""
from __future__ import annotations

from pathlib import Path

from mozo.data.base import DatasetLayoutError
from mozo.data.scenario import CIL_PROTOCOLS, Scenario, Task, build_cil_scenario, class_incremental
from mozo.engine.config import RunConfig

MTCL_PRESETS = {"mtcl-order1": ("order1", None), "mtcl-order2": ("order2", None), "mtcl-order1-5shot": ("order1", 5)}


def build_scenario(cfg: RunConfig, data_root: str | Path | None) -> Scenario:
    """Build the scenario named by `cfg.data.protocol` from the datasets under `data_root`."""
    name = cfg.data.protocol
    if name == "demo":
        from mozo.demo.stream import build_demo_scenario

        return build_demo_scenario(seed=cfg.seed)
    if data_root is None:
        raise ValueError(f"protocol {name!r} reads datasets from disk: pass --data-root DIR (layouts: docs/datasets.md)")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(root, "a folder holding the datasets", "data-root")
    if name in CIL_PROTOCOLS:
        return build_cil_scenario(name, root, few_shot=cfg.data.few_shot, seed=cfg.seed)
    if name.startswith("mtcl"):
        from mozo.data.mtcl import build_mtcl_datasets

        order, shots = MTCL_PRESETS.get(name, ("order1", None))
        shots = cfg.data.few_shot if cfg.data.few_shot is not None else shots
        datasets = build_mtcl_datasets(root, order=order, shots=shots, seed=cfg.seed, datasets=cfg.data.datasets)
        tasks = [Task(n, train, test, list(train.classnames)) for n, train, test in datasets]
        return Scenario("mtcl", tasks, name=name, meta={"order": order, "few_shot": shots})
    if name == "imagefolder":
        from mozo.data.readers import read_imagefolder

        train, test = read_imagefolder(root)
        inc = cfg.data.increment or len(train.classnames)
        first = cfg.data.initial_increment or inc
        scenario = class_incremental(train, test, None, first, inc, few_shot=cfg.data.few_shot, seed=cfg.seed, dataset_name="imagefolder")
        scenario.name = "imagefolder"
        return scenario
    known = sorted(CIL_PROTOCOLS) + sorted(MTCL_PRESETS) + ["imagefolder", "demo"]
    raise ValueError(f"unknown data.protocol {name!r}; choose one of {', '.join(known)}")
