"""The order and display names of attacks and defenses that every table and figure uses."""
from __future__ import annotations

import math
from typing import Iterable

import pandas as pd

ATTACK_NAMES = {"patch": "Patch", "single_pixel": "Single-Pix", "blend_random": "Blend-R",
                "blend_pattern": "Blend-P", "sinusoid": "Sinusoid", "narcissus": "Narcissus", "frequency": "Freq",
                "badnets_white": "BN-W", "badnets_grid": "BN-G", "sig": "SIG", "trojan_square": "TJ-SQ", "trojan_watermark": "TJ-WM",
                "l2_invisible": "L2", "label_consistent": "CL", "dynamic": "Dynamic"}


def attack_order(attacks: Iterable[str]) -> list[str]:
    """Paper order (Fig. 3) for known attacks, then any others in order of appearance."""
    seen = list(dict.fromkeys(a for a in attacks if isinstance(a, str)))  # the clean scenario's rows have none
    known = [a for a in ATTACK_NAMES if a in seen]
    return known + [a for a in seen if a not in ATTACK_NAMES]


def defense_order(df: pd.DataFrame) -> list[str]:
    """Per final-model architecture (the `none` defense's first, then by first appearance): no-defense
    baseline first; then grouped by detector (first appearance), by r_reject within a group."""
    cells = (df.drop_duplicates("defense")
             .assign(detector=lambda c: c["detector"].fillna(""), arch=lambda c: c["arch"].fillna("")))  # NaN != NaN as a key
    det_rank = {d: i for i, d in enumerate(dict.fromkeys(cells["detector"]))}
    base = cells.loc[cells["defense"] == "none", "arch"].tolist()
    arch_rank = {a: i for i, a in enumerate(dict.fromkeys(base + cells["arch"].tolist()))}
    key = {r.defense: (arch_rank[r.arch], r.defense != "none" and r.remedy != "none", det_rank[r.detector],
                       -1.0 if math.isnan(r.r_reject) else r.r_reject, i)
           for i, r in enumerate(cells.itertuples())}
    return sorted(key, key=key.get)


def attack_label(attack: str, dagger: bool = False) -> str:
    return ATTACK_NAMES.get(attack, attack) + ("†" if dagger else "")
