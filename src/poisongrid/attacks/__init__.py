"""Backdoor triggers: `build_attack(name, image_shape, seed, params).apply(images, boost=False)`.

Importing this package registers the BaDLoss and LfD attacks in `ATTACKS`."""
from .base import ATTACKS, Attack, build_attack
from . import simple, frequency, narcissus, lfd_simple, trojan, l2_invisible, label_consistent, dynamic, adaptive  # noqa: F401  (registers the attacks)

# Attacks whose ASR is also reported with a 2x boosted trigger (the paper's "blend-type" attacks).
BLEND_TYPE = frozenset(n for n in ATTACKS.names(plugins=False) if ATTACKS.get(n).boostable)

__all__ = ["ATTACKS", "Attack", "BLEND_TYPE", "build_attack"]
