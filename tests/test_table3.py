"""Table 3 (standard KD): the shapes the feature methods rely on for every teacher/student
pair of every profile, and `refilled table --table 3` on hand-made summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refilled.experiments.profile import load_profile
from refilled.methods import CATALOG
from refilled.methods.fitnet import build_regressor
from refilled.models import build_model
from refilled.report.tables import TableError, write_table

ROOT = Path(__file__).resolve().parents[1]
PAIRS = sorted({(p, load_profile(ROOT, p)["experiments"]["table3"]["teacher"]["arch"], s)
                for p in ("smoke", "demo", "gpu", "paper")
                for s in load_profile(ROOT, p)["experiments"]["table3"]["students"]})


@pytest.mark.parametrize("profile,teacher_arch,student_arch", PAIRS)
def test_fitnet_regressor_and_overhaul_connectors_fit_every_pair(profile, teacher_arch, student_arch):
    """The regressor maps the student's guided layer onto the teacher's hint, the connectors
    each pre-ReLU feature onto the teacher's, at the profile's image size (32 px)."""
    torch.manual_seed(0)
    student, teacher = build_model(student_arch, 10).eval(), build_model(teacher_arch, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        s, t = student(x), teacher(x)
        middle, regressor = build_regressor(student, teacher)
        assert middle == 1
        assert regressor(s.features[middle]).shape == t.features[middle].shape
        method = CATALOG["overhaul"].build(student, teacher, CATALOG["overhaul"].resolve())
        for conn, fs, ft in zip(method.connectors, s.pre_relu, t.pre_relu):
            assert conn(fs).shape == ft.shape


def _summary(path, method, arch, seed, acc, task="student"):
    classes = list(range(10))
    path.write_text(json.dumps({"method": method, "task": task, "arch": arch, "seed": seed, "test_acc": acc,
                                "params": {}, "split": {"ratio": 1.0, "teacher_classes": classes,
                                                        "student_classes": classes}}))
    return path


def test_table3_caption_has_the_teachers_accuracy_and_gaps_are_errors(tmp_path):
    methods = ["student", "kd", "overhaul"]
    runs = [_summary(tmp_path / f"{m}{s}.json", m, "wrn-10-1", s, 0.5 + 0.1 * i + 0.02 * s)
            for i, m in enumerate(methods) for s in (0, 1)]
    teachers = [_summary(tmp_path / f"t{s}.json", "student", "wrn-16-2", s, a, task="teacher")
                for s, a in ((0, 0.80), (1, 0.90))]
    out, long, md = tmp_path / "t3.csv", tmp_path / "t3_long.csv", tmp_path / "t3.md"
    write_table("3", runs, [1], ["wrn-10-1"], methods, None, out, long, md, teachers=teachers)
    text = md.read_text()
    assert "Teacher wrn-16-2: 85.00 ± 7.07 % test accuracy (2 seeds)" in text
    assert "| KD | 61.00 ± 1.41 |" in text and "Overlap ratio" not in text
    with pytest.raises(TableError, match="teacher"):
        write_table("3", runs, [1], ["wrn-10-1"], methods, None, out, long, md, teachers=None)
    with pytest.raises(TableError, match="no runs"):
        write_table("3", runs[:-2], [1], ["wrn-10-1"], methods, None, out, long, md, teachers=teachers)
    with pytest.raises(TableError, match="not a teacher run"):
        write_table("3", runs, [1], ["wrn-10-1"], methods, None, out, long, md, teachers=runs[:1])
