"""Backdoor triggers: `build_attack(name, image_shape, seed, params).apply(images, boost=False)`.

Importing this package registers the seven BaDLoss attacks in `ATTACKS`."""
from .base import ATTACKS, Attack, build_attack
from . import simple, frequency, narcissus, dynamic  # noqa: F401  (registers the attacks)

# Attacks whose ASR is also reported with a 2x boosted trigger (the paper's "blend-type" attacks).
BLEND_TYPE = frozenset(n for n in ATTACKS.names() if ATTACKS.get(n).boostable)

__all__ = ["ATTACKS", "Attack", "BLEND_TYPE", "build_attack"]
