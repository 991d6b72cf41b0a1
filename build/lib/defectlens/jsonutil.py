"""Strict JSON for records that other tools read: JSON has no NaN or infinity."""

from __future__ import annotations

import math

import numpy as np


def finite(obj):
    """A copy with NaN/inf as None and NumPy scalars as Python numbers."""
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
