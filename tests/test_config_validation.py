"""Issue 13: the whole configuration is checked before anything loads; each error names the key, the value
and what is allowed. Nothing here loads a backbone or a dataset."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import get_type_hints

import pytest

from mozo.engine.config import (ALIASES, ConfigError, RunConfig, from_dict, load_config, preset_names, to_dict,
                                valid_keys)
from mozo.peft.inject import PeftConfig
from mozo.peft.moe import MoEConfig
from mozo.zo.config import ZOConfig, check_range
from mozo.zo.plan import PlanError, parse_clauses, parse_plan

ROOT = Path(__file__).resolve().parents[1]


def refused(*overrides: str, preset: str = "demo") -> str:
    with pytest.raises(ConfigError) as err:
        load_config(preset, list(overrides))
    return str(err.value)


# ------------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("override,expected", [
    ("eval_max_samples=-5", "eval_max_samples must be an integer >= 1 or null, got -5"),
    ("eval_max_samples=0", "eval_max_samples must be an integer >= 1 or null, got 0"),
    ("num_tasks=0", "num_tasks must be an integer >= 1 or null, got 0"),
    ("num_tasks=-1", "num_tasks must be an integer >= 1 or null, got -1"),
    ("num_tasks=50", "num_tasks=50 but scenario 'demo' has 4 tasks: num_tasks must be an integer in [1, 4] or null"),
    ("zo.lr=-1", "zo.lr must be a finite number >= 0, got -1.0"),
    ("train.lr=-1", "train.lr must be a finite number >= 0, got -1.0"),
    ("lr=-0.5", "train.lr must be a finite number >= 0, got -0.5"),
    ("epochs=-1", "train.epochs must be an integer >= 1, got -1"),
    ("max_steps_per_task=-1", "train.max_steps_per_task must be an integer >= 0 or null, got -1"),
    ("batch_size=0", "train.batch_size must be an integer >= 1, got 0"),
    ("peft.moe.rank=0", "peft.moe.rank must be an integer >= 1, got 0"),
    ("peft.moe.dropout=2", "peft.moe.dropout must be a finite number in [0, 1), got 2.0"),
    ("peft.adapter.dropout=1", "peft.adapter.dropout must be a finite number in [0, 1), got 1.0"),
    ("peft.lora.dropout=-0.1", "peft.lora.dropout must be a finite number in [0, 1), got -0.1"),
    ("peft.moe.top_k=3", "peft.moe.top_k must be an integer in [1, 2], got 3"),
    ("peft.layers=[0,2]", "peft.layers entries must be an integer >= 1, got 0"),
    ("data.eval_batch_size=0", "data.eval_batch_size must be an integer >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers must be one of auto, an integer >= 0, got -1"),
    ("train.warmup_iters=-1", "train.warmup_iters must be an integer >= 0, got -1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be an integer >= 0, got -1"),
    ("train.weight_decay=-1", "train.weight_decay must be a finite number >= 0, got -1.0"),
    ("train.max_nonfinite_fraction=1.5", "train.max_nonfinite_fraction must be a finite number in [0, 1], got 1.5"),
    ("zo.q=0", "zo.q must be an integer >= 1, got 0"),
    ("zo.eps_vision=0", "zo.eps_vision must be a finite number > 0 or null, got 0.0"),
    ("zo.eps_language=-1e-3", "zo.eps_language must be a finite number > 0 or null, got -0.001"),
    ("zo.weight_decay=-1", "zo.weight_decay must be a finite number >= 0, got -1.0"),
    ("seed=-1", "seed must be an integer >= 0, got -1"),
    ("distributed_timeout_s=0", "distributed_timeout_s must be a finite number > 0, got 0.0"),
])
def test_out_of_range_values_name_key_value_and_range(override, expected):
    assert refused(override) == expected


def test_few_shot_range_on_a_protocol_that_reads_it():
    assert refused("few_shot=0", preset="cifar100-10-10") == "data.few_shot must be an integer >= 1 or null, got 0"
    assert load_config("cifar100-10-10", ["few_shot=5"]).data.few_shot == 5
    assert "data.few_shot is ignored by the demo stream" in refused("few_shot=5")


def float_keys() -> list[str]:
    """Every key whose type is a float (also Optional[float]), found from the dataclasses themselves."""
    out = []
    for key in valid_keys():
        *sections, name = key.split(".")
        cls = RunConfig
        for s in sections:
            cls = get_type_hints(cls)[s]
        if "float" in str(get_type_hints(cls)[name]):
            out.append(key)
    return out


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-inf", ".inf"])
@pytest.mark.parametrize("key", float_keys())
def test_every_float_key_refuses_nan_and_inf(key, value):
    msg = refused(f"{key}={value}")
    assert msg.startswith(f"{key} must be a finite number") and msg.endswith(("nan", "inf"))


def test_float_keys_are_the_expected_ones():
    assert {"zo.lr", "train.lr", "peft.moe.dropout", "peft.lora.alpha", "zo.eps_vision", "distributed_timeout_s"} <= set(float_keys())


def test_limits_and_documented_controls_are_accepted():
    cfg = load_config("demo", ["zo.lr=0", "train.lr=0", "eval_max_samples=1", "num_tasks=4", "max_steps_per_task=1",
                               "train.warmup_iters=0", "train.checkpoint_every=0", "data.num_workers=0", "peft.moe.dropout=0",
                               "peft.lora.dropout=0.99", "seed=0", "zo.eps_vision=1e-6", "peft.moe.top_k=1",
                               "train.max_nonfinite_fraction=1"])
    assert (cfg.zo.lr, cfg.num_tasks, cfg.eval_max_samples) == (0.0, 4, 1)
    cfg = load_config("demo", ["eval_max_samples=null", "max_steps_per_task=null", "num_tasks=null", "zo.eps_vision=null"])
    assert (cfg.eval_max_samples, cfg.train.max_steps_per_task, cfg.num_tasks, cfg.zo.eps_vision) == (None,) * 4


@pytest.mark.parametrize("preset,tasks", [("demo", 4), ("cifar100-10-10", 10), ("cifar100-2-2", 50),
                                          ("tinyimagenet-100-5", 21), ("tinyimagenet-inc10", 20),
                                          ("imagenet-r-inc20", 10), ("mtcl-order1", 11), ("mtcl-order2", 11)])
def test_num_tasks_upper_bound_from_the_preset(preset, tasks):
    assert load_config(preset, [f"num_tasks={tasks}"]).num_tasks == tasks
    assert refused(f"num_tasks={tasks + 1}", preset=preset).startswith(f"num_tasks={tasks + 1} but scenario {preset!r} has {tasks} tasks")


def test_num_tasks_bound_follows_data_datasets():
    assert "has 2 tasks" in refused("data.datasets=[dtd,eurosat]", "num_tasks=3", preset="mtcl-order1")
    assert "unknown MTCL dataset 'foo'" in refused("data.datasets=[dtd,foo]", preset="mtcl-order1")


def test_check_range_helper():
    check_range("k", 3, 1, 3, integer=True)
    check_range("k", None, 1, optional=True)
    for bad, msg in [(True, "k must be an integer >= 1, got True"), (2.0, "k must be an integer >= 1, got 2.0"),
                     (None, "k must be an integer >= 1, got None"), ("3", "k must be an integer >= 1, got '3'")]:
        with pytest.raises(ValueError) as err:
            check_range("k", bad, 1, integer=True)
        assert str(err.value) == msg
    with pytest.raises(ValueError, match=r"k must be a finite number in \(0, 1\], got 0"):
        check_range("k", 0, 0, 1, open_low=True)


def test_sections_check_themselves_with_full_key_names():
    with pytest.raises(ValueError, match=r"^zo\.q must be an integer >= 1, got 0$"):
        ZOConfig(q=0)
    with pytest.raises(ValueError, match=r"^zo\.lr must be a finite number >= 0, got nan$"):
        ZOConfig(lr=float("nan"))
    with pytest.raises(ValueError, match=r"^peft\.moe\.rank must be an integer >= 1, got 0$"):
        PeftConfig(moe=MoEConfig(rank=0))
    with pytest.raises(ValueError, match=r"^peft\.lora\.rank must be an integer >= 1, got 0$"):
        PeftConfig.of("lora", rank=0)
    with pytest.raises(ValueError, match="peft.towers must be one or both of vision, language, got 'visionx'"):
        PeftConfig(towers=("visionx",))


# ------------------------------------------------------------------------------------- choices
@pytest.mark.parametrize("override,expected", [
    ("device=gpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("device=cuda:x", "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    ("distributed_backend=glo", "distributed_backend must be one of auto, nccl, gloo, mpi, ucc, got 'glo'"),
    ("train.precision=fp16", "train.precision must be one of fp32, bf16, got 'fp16'"),
    ("train.schedule=linear", "train.schedule must be one of cosine, constant, got 'linear'"),
    ("peft.towers=visionx", "peft.towers must be one or both of vision, language, got 'visionx'"),
    ("peft.towers=vision,vision", "peft.towers must be one or both of vision, language, got 'vision,vision'"),
    ("peft=prompt", "unknown peft kind 'prompt': peft.kind must be one of moe, lora, adapter"),
    ("zo.distribution=uniform", "zo.distribution must be one of gaussian, rademacher, got 'uniform'"),
    ("peft.lora.targets=q_proj,w_proj", "peft.lora.targets must be a non-empty subset of q_proj, k_proj, v_proj, out_proj, fc1, fc2, got ['q_proj', 'w_proj']"),
])
def test_bad_choices_name_key_value_and_choices(override, expected):
    assert refused(override) == expected


def test_accepted_devices_and_towers():
    for device in ("auto", "cpu", "cuda", "cuda:3", "mps"):
        assert load_config("demo", [f"device={device}"]).device == device
    assert load_config("demo", ["peft.towers=language"]).peft.towers == ("language",)
    assert load_config("demo", ["peft.layers=1,3"]).peft.layers == [1, 3]  # ints, not strings, from the command line


# ------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("template", ["a photo", "a {1} photo", "a {name} photo", "a {} photo of {}", "a {photo",
                                      "a photo}", "a {} }", "a {!r}", "a {:>9}", ""])
def test_template_needs_exactly_one_plain_placeholder(template):
    msg = refused(f"data.template={template}")
    assert msg.startswith("data.template must contain exactly one {} placeholder") and msg.endswith(f"got {template!r}")


def test_templates_with_one_placeholder_and_literal_braces_are_accepted():
    assert load_config("demo", ["data.template=a {{x}} photo of a {}."]).data.template == "a {{x}} photo of a {}."
    assert load_config("demo", ["data.template={}"]).data.template == "{}"


# ------------------------------------------------------------------------------------- data keys
def test_cil_only_keys_are_refused_elsewhere():
    for override in ("data.order=cifar100", "data.order=None", "data.dataset=cifar100", "data.increment=5",
                     "data.initial_increment=5"):
        key = override.split("=")[0]
        assert refused(override, preset="cifar100-10-10").startswith(f"{key} is only read under protocol=cil")
    assert refused("data.datasets=[dtd]").startswith("data.datasets is only read under the mtcl protocols")


def test_data_order_is_a_key_of_class_orders():
    cil = ["protocol=cil", "data.dataset=cifar100", "data.increment=10"]
    assert load_config("demo", [*cil, "data.order=cifar100"]).data.order == "cifar100"
    assert load_config("demo", [*cil, "data.order=null"]).data.order is None
    for bad in ("None", "cifar10"):
        assert refused(*cil, f"data.order={bad}") == (
            f"data.order must be null (the dataset's own order) or a key of class_orders.yaml (cifar100, tinyimagenet), got {bad!r}")


def test_protocol_and_cil_dataset_are_checked():
    assert refused("protocol=cifar100-3-3").startswith("data.protocol must be one of cifar100-10-10,")
    assert refused("protocol=cil").startswith("protocol=cil needs data.dataset, one of cifar100,")


# ------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("plan", ["vision:hopp-odd", "visoin-zo", "vision:", "", "fo+visoin-zo", "vision:0,2",
                                  "visual:zo", "vision:prefix-x", "dual:hop-odd+language:suffix"])
def test_malformed_plans_are_refused_by_the_config(plan):
    msg = refused(f"plan={plan}")
    assert msg.startswith(f"malformed plan {plan!r}") and "PATTERN := hop-odd" in msg


def test_plan_grammar_without_depths_reuses_the_parser():
    clauses = parse_clauses("vision:prefix-6+language:hop-odd", ("vision", "language"))
    assert [(towers, m.group(0), mode) for towers, m, mode in clauses] == [(("vision",), "prefix-6", None), (("language",), "hop-odd", None)]
    assert [t for t, _, _ in parse_clauses("dual-zo", ("vision",))] == [("vision",)]
    parse_clauses("vision:1,40", ("vision", "language"))  # beyond the depth: only parse_plan knows
    with pytest.raises(PlanError, match=r"layers \[40\] are outside 1\.\.12"):
        parse_plan("vision:1,40", {"vision": 12, "language": 12})
    with pytest.raises(PlanError, match="no PEFT units in the language tower"):
        parse_clauses("language-zo", ("vision",))


def test_plan_naming_a_tower_without_units_is_refused():
    assert "no PEFT units in the language tower" in refused("peft.towers=vision", "plan=language:hop-odd")
    assert load_config("demo", ["peft.towers=vision", "plan=dual:hop-odd"]).plan == "dual:hop-odd"


def test_a_bad_plan_fails_the_cli_before_anything_loads(tmp_path, capsys):
    from mozo.cli import main

    t0 = time.perf_counter()
    assert main(["run", "demo", "plan=vision:hopp-odd", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "malformed plan 'vision:hopp-odd'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and time.perf_counter() - t0 < 10


# ------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("content,expected", [
    (b"train: {epochs: 2\nzo: 1\n", "invalid YAML at line 2, column 3"),
    (b"- a\n- b\n", "must hold a mapping of config keys, got a list"),
    (b"just text\n", "must hold a mapping of config keys, got a str"),
    (b"1: 2\n", "config keys must be strings, got 1 (int)"),
    (b"train:\n  1: 2\n", "config keys must be strings, got 'train.1' (int)"),
    (b"name: caf\xe9\n", "not UTF-8 text: byte 0xe9 at line 1"),
    (b"train: {epochz: 2}\n", "unknown config key 'train.epochz'"),
    (b"train: {epochs: x}\n", "config key 'train.epochs' expects an integer, got 'x'"),
])
def test_bad_yaml_files_name_the_file_and_the_problem(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_an_empty_yaml_file_is_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml", ["protocol=demo"]).name == "empty"


def test_from_dict_names_the_wrong_key():
    saved = to_dict(load_config("demo"))
    assert from_dict(saved) == load_config("demo")
    with pytest.raises(ConfigError, match="a configuration must be a mapping of config keys, got a list"):
        from_dict([1, 2])
    for key, value, expected in [("train", {"epochs": -1}, "train.epochs must be an integer >= 1, got -1"),
                                 ("zo", {"lr": "fast"}, "config key 'zo.lr' expects a number, got 'fast'"),
                                 ("plan", "visoin-zo", "malformed plan 'visoin-zo'"),
                                 ("trian", {}, "unknown config key 'trian'"),
                                 ("train", 5, "config key 'train' is a section"),
                                 ("data", {"order": [1, 2]}, "data.order is only read under protocol=cil"),
                                 ("peft", {"towers": [1]}, "peft.towers must be one or both of vision, language, got '1'")]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            from_dict({**saved, key: value})


# ------------------------------------------------------------------------------------- presets and docs
@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips(name):
    cfg = load_config(name)
    assert from_dict(to_dict(cfg)) == cfg


def test_demo_cli_overrides_validate():
    from mozo.demo.cli import DEMO_PLANS
    from mozo.study.cli import CONTROLS, control_overrides

    for _, overrides in DEMO_PLANS:  # mozo demo --quick, each row; zero-shot is max_steps_per_task=0
        load_config("demo", ["train.max_steps_per_task=3", "eval_max_samples=60", *overrides, "seed=0"])
    for control in CONTROLS:  # mozo study's controls: the plan's frozen_control, zo.rule=noise
        for plan in ("plan=vision-zo", "plan=dual:hop-odd"):
            load_config("demo", [plan, *control_overrides("demo", [plan], control)])


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file, preset, key=value overrides) of every `mozo run PRESET ...` line in README.md and docs/."""
    keys = set(valid_keys()) | set(ALIASES)
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for line in path.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
            for m in re.finditer(r"mozo run ([a-z0-9-]+)([^`#]*)", line):
                if m.group(1) in preset_names():
                    # a value holding a shell variable (`seed=$S` in a loop) is a template: its key is still checked
                    overrides = [t for t in m.group(2).split() if "=" in t and t.split("=")[0] in keys and "$" not in t]
                    found.append((path.name, m.group(1), overrides))
    return found


def test_documented_run_commands_validate():
    commands = documented_commands()
    assert len(commands) >= 10 and any(o for _, _, o in commands)
    for name, preset, overrides in commands:
        load_config(preset, overrides)


def test_documented_plans_validate():
    plans = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        plans |= set(re.findall(r"(?<![\w-])plan=([a-z0-9:,+-]+)", path.read_text(encoding="utf-8")))
    assert "vision:hop-even+language:suffix-6" in plans
    for plan in plans:
        assert load_config("demo", [f"plan={plan}"]).plan == plan
