"""Strict JSON: every file the project writes parses with any JSON parser.

Python's json writes float('nan') as the literal `NaN` (and inf as `Infinity`), which is not
JSON: browsers, jq and strict parsers refuse the whole file. Here a non-finite float becomes
null, and `allow_nan=False` makes any value that slipped through an error instead of a bad file.
"""
from __future__ import annotations

import json
import math


def finite_or_none(obj):
    """`obj` with every non-finite float (also numpy's, at any depth) replaced by None;
    tuples become lists, as json writes them anyway."""
    if isinstance(obj, float):   # numpy.float64 is a float subclass
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return finite_or_none(obj.item())   # numpy / torch scalars
    return obj


def dumps(obj, **kwargs) -> str:
    """json.dumps for files and printed output: non-finite floats as null, never NaN/Infinity."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def _refuse(literal: str):
    raise ValueError(f"{literal} is not JSON")


def loads_strict(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (Python's reader accepts them)."""
    return json.loads(text, parse_constant=_refuse)
