"""The supplement's Tables 1-4 as data (`supplement_tables.csv`, transcribed once from the
supplemental material of Ye, Lu and Zhan, "Generalized Knowledge Distillation via Relationship
Matching", IEEE TPAMI 2022; the repository does not ship that text: tests/test_supplement.py
checks every cell against a copy at ../shared/paper/refilled-supplement.txt where there is one).

One row per cell: table ("1".."4"), ratio (as in our paths: 0, 0.25, 1), student (our
architecture names), method (catalog names; Table 4: stage1), k_hat (Table 4 only) and
value (accuracy in %, as printed). Table 3 is standard KD: teacher and student on the same
classes, ratio 1; its REFILLED row is our `refilled-std` (the CVPR code's standard-KD settings).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

TABLES_CSV = Path(__file__).with_name("supplement_tables.csv")
# Table 3's caption: the WRN-(28,4) teacher's test accuracy on CIFAR-100
TABLE3_TEACHER_ACC = 78.91


@lru_cache(maxsize=1)
def rows() -> tuple[dict, ...]:
    with open(TABLES_CSV, encoding="utf-8", newline="") as f:
        return tuple({**r, "value": float(r["value"])} for r in csv.DictReader(f))


def table(number: str | int) -> list[dict]:
    """The cells of one table (an empty list for a table the supplement does not have)."""
    return [r for r in rows() if r["table"] == str(number)]


def students(number: str | int) -> list[str]:
    """The students (columns) of one table, in the supplement's order."""
    return list(dict.fromkeys(r["student"] for r in table(number)))


def value(number: str | int, ratio: str, student: str, method: str, k_hat: str = "") -> float | None:
    """The supplement's value of one cell, or None where it has no such cell."""
    for r in table(number):
        if (r["ratio"], r["student"], r["method"], r["k_hat"]) == (ratio, student, method, k_hat):
            return r["value"]
    return None
