"""
MiLoRA (Wang et al., 2024): PiSSA's initialisation from the r smallest singular values of W0 instead of the largest,
so the adapter starts in the directions the base uses least (pissa.py, docs/PISSA.md).
"""
import pissa

controller = pissa.controller  # the same state for resume: A0, B0


def wrap(model, cfg):
    return pissa.wrap(model, cfg, minor=True)
