"""Scaling laws as a tool: KM and Chinchilla laws, fitting them to runs, planning a budget."""

from lmforge.scaling.fit import ChinchillaFit, fit_chinchilla, fit_isoflop
from lmforge.scaling.laws import (
    CHINCHILLA,
    KAPLAN,
    PF_DAY,
    ChinchillaLaw,
    KaplanLaw,
    training_flops,
)

__all__ = [
    "CHINCHILLA",
    "KAPLAN",
    "PF_DAY",
    "ChinchillaFit",
    "ChinchillaLaw",
    "KaplanLaw",
    "fit_chinchilla",
    "fit_isoflop",
    "training_flops",
]
