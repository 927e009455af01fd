"""MoZO, the paper's modality-aware rule: element-wise sign normalisation with a smaller perturbation on the
vision tower than on the language tower (the paper gives no values). The epsilons were kept after
`mozo sweep` on the demo stream (flat: no epsilon beats another beyond seed noise) and `mozo diagnose`
(both lie where the finite-difference error is smallest); see docs/diagnostics.md."""
from __future__ import annotations

from mozo.zo.rules.sign import Sign

MOZO_EPS = {"vision": 5e-4, "language": 1e-3}


class MoZO(Sign):
    name = "mozo"
    applied_as = "sign"
    default_eps = MOZO_EPS
