"""The one seed-mixing function of mozo: every seeded choice (ZO directions, unit noise, data order and
augmentation, few-shot picks, splits, evaluation subsets) derives its seed here, so no two schemes can
collide or correlate."""
from __future__ import annotations


import hashlib


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and strings: sha256 of the parts joined by '/', identical on every
    machine and Python version (no hash() randomisation, no RNG stream), uncorrelated for nearby inputs."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
