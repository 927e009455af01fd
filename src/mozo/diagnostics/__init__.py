"""Diagnostics of the zeroth-order estimator and of MoZO's epsilons (docs/diagnostics.md).

- `stats`: variance, norm, cosine and finite-difference error of the estimator of any parameter block
- `measure`: the same per unit (modality, layer) of a MozoCLIP, per tower, or jointly as trained
- `plots`: the diag_*.png figures; `cli`: `mozo diagnose`; `sweep`: `mozo sweep`
"""
