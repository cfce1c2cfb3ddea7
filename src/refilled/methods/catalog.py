"""The methods, one line each (torch-free: the Snakefile, the profile checks and the tables
read it in the scheduler process).

To add a method: write `src/refilled/methods/<file>.py` (its class and its `HPARAMS`),
add its line below, and an oracle test of its loss. Every command (`refilled train
--method NAME`), the workflow's training rule, the tables, `refilled bench` and the
catalog-parametrised tests pick it up from here.

Fields of a line:
- name: the method's one name (CLI, paths, summaries, table rows)
- cls: "module:Class", imported only when a run builds it
- label: its row label in the tables
- teacher: whether it needs a trained teacher (`--teacher`)
- starts_from: the method whose finished run initialises the student (`--init`), or None
- applies_to: "any" overlap, or "same-classes" (teacher and student on the same classes)
- scored_by: "test_acc" (the student's head) or "ncm_acc" (embedding only)
- in_tables: shown as a row of Tables 1 and 2 (by default)
- preset: hyper-parameters fixed by this line (the REFILLED rows differ only there)
- path: hyper-parameters spelled in the run directory's name, with their prefix
  (`stage1_kinf`, `refilled_lam2`), because the workflow sweeps them
- schedule: the learning-rate schedule of its recipe
- epochs: the experiment key (config/<profile>.yaml) holding its number of epochs
- bench: a row of `refilled bench` (one per distinct step is enough)
- alias: the subcommand of earlier versions that runs it (`refilled train-stage1`, ...)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from refilled.methods.params import HParam, ParamError, read_declaration


@functools.lru_cache(maxsize=None)
def _module_file(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    return None if spec is None else spec.origin


@dataclass(frozen=True)
class Entry:
    name: str
    cls: str
    label: str
    teacher: bool = True
    starts_from: str | None = None
    applies_to: str = "any"
    scored_by: str = "test_acc"
    in_tables: bool = True
    preset: dict = field(default_factory=dict)
    path: dict = field(default_factory=dict)
    schedule: str = "multistep"
    epochs: str = "stage2_epochs"
    bench: bool = True
    alias: str | None = None

    @property
    def module(self) -> str:
        return self.cls.split(":")[0]

    @property
    def hparams(self) -> dict[str, HParam]:
        """The method file's declaration (read from its source, not imported)."""
        origin = _module_file(self.module)
        if origin is None:
            raise ImportError(f"method {self.name}: module {self.module} not found")
        return read_declaration(Path(origin))

    @property
    def settable(self) -> dict[str, HParam]:
        """Hyper-parameters a profile or `--set` may change (the preset ones are fixed)."""
        return {k: v for k, v in self.hparams.items() if k not in self.preset}

    def load(self):
        module, _, attr = self.cls.partition(":")
        return getattr(importlib.import_module(module), attr)

    def build(self, student, teacher, values: dict[str, Any]):
        """The method's module (a `refilled.methods.base.Method`) around `student`."""
        cls = self.load()
        method = cls(student, teacher, **values) if self.teacher else cls(student, **values)
        method.trains_classifier = self.scored_by == "test_acc"
        return method

    def resolve(self, overrides: dict[str, Any] | None = None, where: str = "") -> dict[str, Any]:
        """Every hyper-parameter's value: declared default < preset < overrides; each checked."""
        where = where or f"method {self.name}"
        declared = self.hparams
        values = {k: p.parse(p.default, where) for k, p in declared.items()}
        values.update({k: declared[k].parse(v, where) for k, v in self.preset.items()})
        for key, value in (overrides or {}).items():
            if key in self.preset:
                raise ParamError(f"{where}: {key} is fixed to {self.preset[key]!r} by method {self.name} "
                                 f"(it is what makes it {self.label})")
            if key not in declared:
                allowed = ", ".join(sorted(self.settable)) or "none"
                raise ParamError(f"{where}: method {self.name} has no hyper-parameter {key!r}; allowed keys: {allowed}")
            values[key] = declared[key].parse(value, where)
        return values

    def run_name(self, values: dict[str, Any]) -> str:
        """The run directory's name: the method, then each swept hyper-parameter."""
        hp = self.hparams
        return self.name + "".join(f"_{prefix}{hp[k].format(values[k])}" for k, prefix in self.path.items())

    def applies(self, teacher_classes, student_classes) -> bool:
        return self.applies_to == "any" or list(teacher_classes) == list(student_classes)


CATALOG: dict[str, Entry] = {e.name: e for e in (
    Entry("student", "refilled.methods.student:Student", "Student", teacher=False, alias="train-baseline"),
    Entry("rkd", "refilled.methods.rkd:RKD", "RKD", alias="train-baseline"),
    Entry("aml", "refilled.methods.aml:AML", "AML", alias="train-baseline"),
    Entry("stage1", "refilled.methods.stage1:ComparisonMatching", "REFILLED stage 1", scored_by="ncm_acc",
          in_tables=False, path={"k_hat": "k"}, schedule="cosine", epochs="stage1_epochs", alias="train-stage1"),
    Entry("refilled-emb", "refilled.methods.stage2:LocalDistillation", "REFILLED^EMB", starts_from="stage1",
          preset={"weighting": "none"}, path={"lam": "lam"}, bench=False, alias="train-stage2"),
    Entry("refilled-minus", "refilled.methods.stage2:LocalDistillation", "REFILLED^-", starts_from="stage1",
          preset={"weighting": "constant"}, path={"lam": "lam"}, bench=False, alias="train-stage2"),
    Entry("refilled", "refilled.methods.stage2:LocalDistillation", "REFILLED", starts_from="stage1",
          path={"lam": "lam"}, alias="train-stage2"),
    # Table 3, standard KD (teacher and student on the same classes); not rows of Tables 1 and 2.
    Entry("kd", "refilled.methods.kd:KD", "KD", applies_to="same-classes", in_tables=False),
    Entry("fitnet-hint", "refilled.methods.fitnet:FitNetHint", "FitNet hint stage", scored_by="ncm_acc",
          in_tables=False, epochs="stage1_epochs", bench=False),
    Entry("fitnet", "refilled.methods.kd:KD", "FitNet", starts_from="fitnet-hint", applies_to="same-classes",
          in_tables=False, bench=False),
    Entry("at", "refilled.methods.at:AT", "AT", in_tables=False),
    Entry("jacobian", "refilled.methods.jacobian:JacobianMatching", "Jacobian", applies_to="same-classes",
          in_tables=False),
    Entry("overhaul", "refilled.methods.overhaul:Overhaul", "Overhaul", in_tables=False),
    # REFILLED with the authors' CVPR code's standard-KD stage 2 (GitHub njulus/REFILLED, main.py
    # defaults): lambda = 100 on every instance, tau2 = 2 on both local classifiers, global centres
    Entry("refilled-std", "refilled.methods.stage2:LocalDistillation", "REFILLED", starts_from="stage1",
          applies_to="same-classes", in_tables=False,
          preset={"weighting": "constant", "lam": 100.0, "tau": 2.0, "centers": "fixed", "kl_scale": "none"},
          bench=False),
)}

# The method that trains a teacher on its own classes (`refilled train --task teacher`), and
# the baseline every other step is measured against in `refilled bench`: plain CE.
TEACHER_METHOD = "student"


def get(name: str) -> Entry:
    try:
        return CATALOG[name]
    except KeyError:
        raise ParamError(f"unknown method {name!r}; the catalog has: {', '.join(CATALOG)}") from None


def applies(method: str, ratio) -> bool:
    """Whether a method has a cell at this overlap ratio (same classes: r = 1 under the split rule)."""
    return CATALOG[method].applies_to == "any" or float(ratio) == 1.0


def table_methods() -> list[str]:
    """The rows of Tables 1 and 2 by default, in catalog order."""
    return [e.name for e in CATALOG.values() if e.in_tables]


@contextlib.contextmanager
def registered(*entries: Entry) -> Iterator[None]:
    """Add entries for the duration of a block (tests and notebooks; a method that stays
    belongs in CATALOG above)."""
    clash = [e.name for e in entries if e.name in CATALOG]
    if clash:
        raise ValueError(f"method(s) already in the catalog: {', '.join(clash)}")
    CATALOG.update({e.name: e for e in entries})
    try:
        yield
    finally:
        for e in entries:
            CATALOG.pop(e.name, None)


def protocol_table() -> str:
    """Markdown: every method's hyper-parameters with defaults and meanings (docs/cli.md's
    methods table is this text; a test keeps them equal)."""
    lines = ["| method | hyper-parameter | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for e in CATALOG.values():
        hp = e.hparams
        fixed = ", ".join(f"{k} = {v}" for k, v in e.preset.items())
        lines.append(f"| `{e.name}` ({e.label}) | " + (f"preset: {fixed}" if fixed else "—") + " | | | "
                     + ("needs a teacher" if e.teacher else "no teacher")
                     + (f"; starts from `{e.starts_from}`" if e.starts_from else "")
                     + ("" if e.applies_to == "any" else "; same classes only") + f"; scored by {e.scored_by} |")
        for k, p in hp.items():
            if k in e.preset:
                continue
            lines.append(f"| | `{k}` | {p.format(p.parse(p.default, e.name))} | {p.allowed()} | {p.meaning} |")
    return "\n".join(lines) + "\n"
