"""The rule registry: every rule by name, unknown names listed, what a rule declares is what the step does."""
from __future__ import annotations

import pytest
import torch

from mozo.zo.config import ZOConfig
from mozo.zo.estimator import Estimator, Group
from mozo.zo.rules import RULES, ZORecord, get_rule, replay


def test_every_rule_is_registered_under_its_name():
    assert set(RULES) == {"sgd", "sign", "sign-scalar", "conservative", "adamw", "mozo", "noise"}
    assert all(get_rule(name).name == name for name in RULES)


def test_an_unknown_rule_lists_the_registered_ones():
    with pytest.raises(ValueError, match="registered rules: sgd, sign, sign-scalar, conservative, adamw, mozo, noise"):
        ZOConfig(rule="adam")


def test_mozo_is_sign_with_its_own_epsilons():
    cfg = ZOConfig(rule="mozo")
    assert cfg.update == "sign" and (cfg.eps("vision"), cfg.eps("language")) == (5e-4, 1e-3)
    assert ZOConfig(rule="mozo", eps_vision=2e-4).eps("vision") == 2e-4 and ZOConfig().eps("vision") == 1e-3


def test_rules_that_depend_on_more_than_the_record_refuse_replay():
    record = ZORecord(0, [1], {"vision": [0.5]}, 1e-3, "adamw", "gaussian")
    with pytest.raises(ValueError, match="cannot be replayed"):
        replay(Estimator({"vision": Group([torch.zeros(3)], 1e-3)}), [record])


def test_adamw_rule_keeps_its_state_through_a_checkpoint(make_model, batch):
    from mozo.engine.step import HybridStep

    model = make_model()
    a = HybridStep(model, "vision-zo", ZOConfig(rule="adamw", lr=1e-3))
    a(*batch)
    saved = a.state_dict()
    assert saved["rule"]["state"]  # AdamW moments exist after one step
    b = HybridStep(model, "vision-zo", ZOConfig(rule="adamw", lr=1e-3))
    b.load_state_dict(saved)
    assert torch.equal(b.rule.optimizer.state_dict()["state"][0]["exp_avg"], saved["rule"]["state"][0]["exp_avg"])


def test_the_noise_rule_carries_no_loss_information():
    """Its update is the same whatever the loss differences were; it moves as far as MoZO's sign step."""
    noise, mozo_rule = get_rule("noise"), get_rule("mozo")
    assert noise.default_eps == mozo_rule.default_eps  # the same perturbations
    start = [torch.randn(40, generator=torch.Generator().manual_seed(1))]
    moved = []
    for coefs in ([0.3, -2.0], [-50.0, 1e-6], [float("nan"), 7.0]):
        p = [t.clone() for t in start]
        noise.update_group(p, [11, 12], coefs, 1e-2, "gaussian")
        moved.append(p[0] - start[0])
    assert torch.equal(moved[0], moved[1]) and torch.equal(moved[0], moved[2])
    assert torch.allclose(moved[0].abs(), torch.full((40,), 1e-2))  # every coordinate moves by lr, as sign/mozo
    p = [t.clone() for t in start]
    mozo_rule.update_group(p, [11, 12], [0.3, -2.0], 1e-2, "gaussian")
    assert not torch.equal(p[0] - start[0], moved[0])  # and it is not MoZO's step
