"""The supplement's tables as data: every cell of src/refilled/report/supplement_tables.csv is found
where it should be in the supplement's own text, and every number of the text's tables is in
the CSV. The repository does not ship the paper's text: the two transcription tests read it from
../shared/paper/refilled-supplement.txt beside the repository (present in CI) and skip elsewhere."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from refilled.report import supplement
from refilled.methods import CATALOG

SUPPLEMENT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "paper" / "refilled-supplement.txt"
LABELS = {"student": "Student", "rkd": "RKD", "aml": "AML", "refilled-emb": "REFILLED ^{EMB}",
          "refilled-minus": "REFILLED ⁻", "refilled": "REFILLED", "kd": "KD [3]", "fitnet": "FitNet [4]",
          "at": "AT [5]", "jacobian": "Jacobian [6]", "overhaul": "Overhaul [7]",
          "refilled-std": "REFILLED"}   # Table 3's REFILLED row is our standard-KD REFILLED


@cache
def supplement_text() -> str:
    if not SUPPLEMENT_TEXT.is_file():
        pytest.skip(f"the supplement's text is not shipped; transcription checked only where {SUPPLEMENT_TEXT} exists")
    return SUPPLEMENT_TEXT.read_text(encoding="utf-8")


def blocks() -> dict[str, list[str]]:
    """Each table's lines, cut at the captions: Table 1's data run from section 2's end to its
    caption, each later table's from the previous caption to its own."""
    lines = supplement_text().splitlines()
    caption = {n: next(i for i, l in enumerate(lines) if l.startswith(f"Table {n}:")) for n in "1234"}
    start1 = next(i for i, l in enumerate(lines) if l.startswith("A model has a high harmonic mean"))
    bounds = {"1": (start1, caption["1"]), "2": (caption["1"], caption["2"]), "3": (caption["2"], caption["3"]),
              "4": (caption["3"], caption["4"])}
    return {n: lines[a:b] for n, (a, b) in bounds.items()}


def numbers(line: str) -> list[str]:
    return [t.strip() for t in line.split("\t")[1:] if re.fullmatch(r"\d+(\.\d+)?", t.strip())]


def section(lines: list[str], ratio: str) -> list[str]:
    """The lines under 'Overlap Ratio = N%' up to the next such header."""
    head = f"Overlap Ratio = {round(float(ratio) * 100)}%"
    i = lines.index(next(l for l in lines if l.startswith(head)))
    rest = lines[i + 1:]
    end = next((j for j, l in enumerate(rest) if l.startswith("Overlap Ratio")), len(rest))
    return rest[:end]


def column_of(header: str, student: str) -> int:
    cells = [c.strip() for c in header.split("\t")[1:] if c.strip()]
    if header.startswith("Width Multiplier"):
        names = [f"mobilenet-{float(c):.2f}".rstrip("0").rstrip(".") for c in cells]
        names = [n if "." in n else n + ".0" for n in names]
    else:
        names = ["wrn-" + "-".join(re.findall(r"\d+", c)) for c in cells]
    return names.index(student)


def text_value(row: dict) -> float:
    lines = blocks()[row["table"]]
    if row["table"] == "4":
        line = next(l for l in lines if l.startswith(f"overlap ratio = {round(float(row['ratio']) * 100)}%"))
        return float(numbers(line)[["1", "5", "inf"].index(row["k_hat"])])
    part = lines if row["table"] == "3" else section(lines, row["ratio"])
    header = next(l for l in part if l.startswith(("Width Multiplier", "(depth, width)")))
    line = next(l for l in part if l.split("\t")[0] == LABELS[row["method"]])
    return float(numbers(line)[column_of(header, row["student"])])


def test_every_cell_is_in_the_text():
    wrong = [(r, text_value(r)) for r in supplement.rows() if text_value(r) != r["value"]]
    assert not wrong, wrong[:5]


def test_every_number_of_the_tables_is_in_the_csv():
    for n, lines in blocks().items():
        in_text = sum(len(numbers(l)) for l in lines if l.split("\t")[0] in LABELS.values() or
                      l.startswith("overlap ratio"))
        assert in_text == len(supplement.table(n)), f"table {n}"
    assert len(supplement.rows()) == 5 * 6 * 4 + 6 * 6 * 4 + 7 * 3 + 2 * 3


def test_each_cell_is_in_the_csv_once():
    """A repeated (table, ratio, student, method, k_hat) would shadow a cell: `value` reads the first."""
    keys = [(r["table"], r["ratio"], r["student"], r["method"], r["k_hat"]) for r in supplement.rows()]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    assert not repeated, repeated


def test_names_are_ours():
    """Methods are catalog names (Table 3's REFILLED: refilled-std, the standard-KD settings) and
    the ratios are spelled as in our paths."""
    for r in supplement.rows():
        assert r["ratio"] in {"0", "0.2", "0.25", "0.4", "0.5", "0.6", "0.75", "0.8", "1"}
        assert r["method"] in CATALOG, r
    assert {r["method"] for r in supplement.table(3)} == {"student", "kd", "fitnet", "at", "jacobian", "overhaul",
                                                          "refilled-std"}
    assert supplement.value(2, "0.6", "wrn-40-2", "refilled") == 80.66
    assert supplement.value(4, "0", "mobilenet-1.0", "stage1", "inf") == 32.69
    assert supplement.value(2, "0.6", "wrn-40-2", "nope") is None
