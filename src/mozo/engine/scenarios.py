"""From a run configuration to a `Scenario`: which datasets, split how, under which protocol."""
from __future__ import annotations

from pathlib import Path

from mozo.data.base import DatasetLayoutError
from mozo.data.readers import READERS, read_dataset
from mozo.data.scenario import CIL_PROTOCOLS, Scenario, Task, build_cil_scenario, class_incremental, load_class_orders
from mozo.engine.config import RunConfig

MTCL_PRESETS = {"mtcl-order1": ("order1", None), "mtcl-order2": ("order2", None), "mtcl-order1-5shot": ("order1", 5)}


def build_scenario(cfg: RunConfig, data_root: str | Path | None) -> Scenario:
    """Build the scenario named by `cfg.data.protocol` from the datasets under `data_root`."""
    name = cfg.data.protocol
    if name == "demo":
        from mozo.data.demo_stream import build_demo_scenario

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
    if name == "cil":
        return custom_cil(cfg, root)
    known = sorted(CIL_PROTOCOLS) + sorted(MTCL_PRESETS) + ["cil", "demo"]
    raise ValueError(f"unknown data.protocol {name!r}; choose one of {', '.join(known)}")


def custom_cil(cfg: RunConfig, root: Path) -> Scenario:
    """protocol=cil: any reader, any increments, optionally a published class order."""
    d = cfg.data
    if d.dataset not in READERS:
        raise ValueError(f"protocol=cil needs data.dataset, one of {sorted(READERS)}; got {d.dataset!r}")
    train, test = read_dataset(d.dataset, root)
    inc = d.increment or len(train.classnames)
    order = load_class_orders()[d.order] if d.order else None
    scenario = class_incremental(train, test, order, d.initial_increment or inc, inc, few_shot=d.few_shot, seed=cfg.seed, dataset_name=d.dataset)
    scenario.name = f"{d.dataset}-cil"
    return scenario
