"""Strict JSON: non-finite numbers are written as null, and nothing bypasses the writer."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from contsup import jsonio

ROOT = Path(__file__).resolve().parents[1]


def test_non_finite_becomes_null_at_any_depth():
    obj = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": np.float32("nan"), "e": np.float64(3.0)},
           "f": torch.tensor(float("inf")), "g": np.int64(7), "h": "NaN", "i": True, "j": None}
    text = jsonio.dumps(obj, indent=1)
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    assert jsonio.loads_strict(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": None, "e": 3.0},
                                         "f": None, "g": 7, "h": "NaN", "i": True, "j": None}


def test_strict_reader_refuses_what_python_writes_by_default():
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="not JSON"):
            jsonio.loads_strict(json.dumps({"x": value}))


def test_no_json_writer_bypasses_the_helper():
    """Every json.dump/json.dumps in the package and the benchmarks goes through jsonio
    (or says allow_nan=False itself)."""
    offenders = []
    for path in sorted([*(ROOT / "contsup").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        if path.name == "jsonio.py":
            continue
        text = path.read_text()
        for match in re.finditer(r"\bjson\.dumps?\(", text):
            call = text[match.start():text.find("\n", match.start())]
            if "allow_nan=False" not in call:
                offenders.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}")
    assert not offenders, f"use contsup.jsonio.dumps: {offenders}"
