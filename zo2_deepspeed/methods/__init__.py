"""ZO methods, selected by ``zo2.method``."""
from __future__ import annotations

from ..config import ZO2Config
from .base import Estimate, PendingUpdate, Perturbation, ZOMethod
from .fzoo import FZOO
from .hizoo import HiZOO
from .lozo import LOZO
from .mezo import MeZO

METHODS: dict[str, type[ZOMethod]] = {"mezo": MeZO, "fzoo": FZOO, "hizoo": HiZOO, "lozo": LOZO}


def build_method(config: ZO2Config) -> ZOMethod:
    try:
        cls = METHODS[config.method]
    except KeyError:
        raise NotImplementedError(f"zo2.method={config.method!r} is not available in this version "
                                  f"(available: {sorted(METHODS)})") from None
    return cls(config)


__all__ = ["Estimate", "PendingUpdate", "Perturbation", "ZOMethod", "MeZO", "FZOO", "HiZOO", "LOZO", "METHODS",
           "build_method"]
