"""The ZO signal of a run (engine/signal.py): step sizes per part, and the held-out gain of the ZO change
against a random change of the same size."""
from __future__ import annotations

import torch

from conftest import randomize_units
from mozo.engine.signal import ZOSignal


def heldout_loss(model, batch):
    pixels, labels, text = batch
    return torch.nn.functional.cross_entropy(model.logits(model.encode_images(pixels), model.encode_texts(text)).float(), labels)


def test_a_descent_step_gains_more_than_noise_of_its_size(make_model, batch):
    model = make_model(dropout=0.0, noisy_gating=False)
    randomize_units(model, std=0.1)
    plan = model.plan("vision-zo")
    signal = ZOSignal(model, plan, gain_every=1, seed=0)
    zo = signal.parts["zo.vision"]
    model.eval()
    for p in zo:
        p.requires_grad_(True)
    grads = torch.autograd.grad(heldout_loss(model, batch), zo, allow_unused=True)  # noise weights get none
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(zo, grads)]
    signal.before_step()
    with torch.no_grad():
        for p, g in zip(zo, grads):
            p.sub_(0.5 * g)
    after = [p.detach().clone() for p in zo]
    record = signal.after_step(0, 1, batch)
    assert record["zo_gain"] > 0 and record["zo_gain"] > 10 * abs(record["noise_gain"])
    assert all(torch.equal(p, a) for p, a in zip(zo, after))  # the measured change stays applied
    summary = signal.summary()["0"]
    assert summary["step_rms"]["zo.vision"] > 0 and summary["step_rms"]["fo"] == 0.0
    assert summary["gain_measurements"] == 1 and summary["zo_to_fo_step_ratio"]["zo.vision"] is None  # FO did not move


def test_units_that_do_not_move_have_no_step_and_no_gain(make_model, batch):
    model = make_model()
    signal = ZOSignal(model, model.plan("dual:hop-odd"), gain_every=2, seed=0)
    signal.before_step()
    assert signal.after_step(0, 1, batch) is None  # not a gain step
    signal.before_step()
    record = signal.after_step(0, 2, batch)
    assert record["zo_gain"] == 0.0 and record["noise_gain"] == 0.0
    assert set(signal.summary()["0"]["step_rms"]) == {"fo", "zo.vision", "zo.language"}
    assert all(v == 0.0 for v in signal.summary()["0"]["step_rms"].values())
