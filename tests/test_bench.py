"""`mozo bench`: the memory tracker on known allocations, and the whole command on the tiny backbone."""
from __future__ import annotations

import json

import pytest
import torch

from mozo.bench.cli import format_table, split_plans
from mozo.bench.memory import SavedTensorCounter, measure_peak, running_peak, storage_bytes
from mozo.cli import main as mozo_main

ROW_FIELDS = ("plan", "peak_mem_bytes", "peak_above_model_bytes", "saved_activation_bytes", "step_time_s",
              "step_cpu_time_s", "forward_passes", "backward_passes", "trainable_params", "model_param_bytes",
              "memory_method")
PLANS = ("fo", "dual-zo", "vision-zo", "language:suffix-2")
MB = 1_000_000


def test_split_plans_keeps_layer_lists():
    assert split_plans("fo, dual-zo,vision:1,3,5,language:suffix-2") == ["fo", "dual-zo", "vision:1,3,5", "language:suffix-2"]
    assert split_plans("vision:prefix-6+language:2,4,dual-zo") == ["vision:prefix-6+language:2,4", "dual-zo"]


def test_running_peak():
    assert running_peak([(0, 10), (1, 5), (2, -10), (3, 20), (4, -25)]) == 25
    assert running_peak([(0, -10), (1, 5)]) == 0  # frees of older tensors never make a peak


def test_cpu_peak_tracks_transient_allocations():
    """A 4 MB, then an 8 MB buffer alive together, all freed at the end: peak 12 MB above the start."""
    keep = torch.zeros(MB // 4)

    def fn():
        a = torch.empty(MB // 4)  # 1 MB (float32)
        a = torch.empty(MB)  # 4 MB; the 1 MB buffer is freed when `a` is rebound
        b = torch.empty(2 * MB)  # 8 MB
        del a, b
        return 1

    out, mem = measure_peak(fn, torch.device("cpu"), state=[keep])
    assert out == 1
    assert mem.state_bytes == MB
    assert 12 * MB <= mem.peak_delta_bytes <= 13 * MB + 4096
    assert mem.peak_bytes == mem.state_bytes + mem.peak_delta_bytes


def test_saved_tensor_counter_excludes_parameters():
    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(8, 32, requires_grad=True)
    with SavedTensorCounter(exclude=[w]) as saved:
        y = (x @ w.t()).relu()  # mm saves x and w (w excluded); relu saves its output
        y.sum().backward()
    assert saved.bytes == storage_bytes([x]) + 8 * 64 * 4
    with SavedTensorCounter(exclude=[w]) as saved, torch.no_grad():
        (x @ w.t()).relu()
    assert saved.bytes == 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--backbone", "tiny", "--plans", ",".join(PLANS), "--steps", "2", "--warmup", "1",
            "--threads", "1", "--device", "cpu", "--json", str(out / "bench.json"), "--plot", str(out / "memory.png")]
    code = mozo_main(args)
    return code, out


def test_bench_cli_writes_every_field(bench):
    code, out = bench
    assert code == 0
    rows = json.loads((out / "bench.json").read_text())
    assert isinstance(rows, list)
    assert [r["plan"] for r in rows] == list(PLANS) + ["inference"]
    for r in rows:
        for key in ROW_FIELDS:
            assert key in r, f"{r['plan']} lacks {key}"
        assert r["peak_mem_bytes"] >= r["model_param_bytes"] > 0
        assert r["step_time_s"] > 0
        assert {"fo", "zo", "frozen", "vision.fo", "language.zo", "total"} <= set(r["trainable_params"])
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_orderings(bench):
    _, out = bench
    rows = {r["plan"]: r for r in json.loads((out / "bench.json").read_text())}
    fo, dual, vision, inference = rows["fo"], rows["dual-zo"], rows["vision-zo"], rows["inference"]
    assert dual["saved_activation_bytes"] == 0
    assert inference["saved_activation_bytes"] == 0 and inference["backward_passes"] == 0
    assert 0 < vision["saved_activation_bytes"] < fo["saved_activation_bytes"]
    assert rows["language:suffix-2"]["saved_activation_bytes"] < fo["saved_activation_bytes"]
    assert dual["peak_above_model_bytes"] < vision["peak_above_model_bytes"] < fo["peak_above_model_bytes"]
    assert dual["peak_above_model_bytes"] <= 1.25 * inference["peak_above_model_bytes"]
    assert fo["trainable_params"]["zo"] == 0 and dual["trainable_params"]["fo"] == 0
    assert vision["trainable_params"]["vision.zo"] == vision["trainable_params"]["zo"] > 0
    assert fo["backward_passes"] == 1 and dual["backward_passes"] == 0
    table = format_table(list(rows.values()))
    assert "| fo |" in table and "| inference |" in table


def test_bench_rejects_bad_arguments(capsys):
    assert mozo_main(["bench", "--backbone", "tiny", "--steps", "0"]) == 2
    assert mozo_main(["bench", "--backbone", "tiny", "--plans", "fo,vision:bogus"]) == 2
    assert "unknown pattern 'bogus'" in capsys.readouterr().err
    assert mozo_main(["bench", "--backbone", "tiny", "--towers", "audio"]) == 2


@pytest.mark.parametrize("plan", ["fo", "vision-zo"])
def test_static_text_features_are_computed_once(make_model, batch, one_thread, plan):
    """Units on the vision tower only: the class prompts' features are computed at the first step and
    reused while the prompts stay the same; the trajectory is the one without the cache."""
    import mozo
    from conftest import randomize_units, snapshot

    pixels, labels, text = batch
    runs = []
    for use_cache in (True, False):
        model = make_model(seed=0, towers=("vision",))
        randomize_units(model, seed=1)
        step = mozo.HybridStep(model, plan, mozo.ZOConfig(lr=1e-2), fo_lr=1e-2, seed=2)
        assert step.static_text
        step.static_text = use_cache
        stats = [step(pixels, labels, text) for _ in range(3)]
        runs.append(([s.loss for s in stats], [s.tower_forwards["language"] for s in stats], snapshot(model)))
    (loss_c, fwd_c, state_c), (loss_n, fwd_n, state_n) = runs
    assert fwd_c == [1, 0, 0] and fwd_n == [1, 1, 1]
    assert loss_c == loss_n
    assert all(torch.equal(state_c[k], state_n[k]) for k in state_c)
    # other prompts: a miss, computed again
    other = {k: v.flip(0) for k, v in text.items()}
    model = make_model(seed=0, towers=("vision",))
    step = mozo.HybridStep(model, plan, mozo.ZOConfig(), seed=2)
    assert [step(pixels, labels, t).tower_forwards["language"] for t in (text, text, other, other)] == [1, 0, 1, 0]


def test_noisy_or_trainable_language_units_disable_the_text_cache(make_model):
    import mozo

    model = make_model()  # MoE on both towers: dropout and router noise
    assert not mozo.HybridStep(model, "language:frozen").static_text
    assert not mozo.HybridStep(model, "vision-zo").static_text
    quiet = make_model(kind="adapter", dropout=0.0)
    assert mozo.HybridStep(quiet, "language:frozen").static_text
