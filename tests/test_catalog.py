"""The method catalog: what a new method needs (its file, one catalog line), the checks of
`--set` against a method's declaration, and properties every method of the catalog must
have (finite under bf16 autocast, exact resume). The step-level properties (eager equals
the graph-emulated step, no host sync) are parametrised over the catalog in test_step.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from methods_cases import CASE_IDS, batches, build_case
from resume_check import kill_then_resume

from refilled.methods import CATALOG, Entry, ParamError, get, registered
from refilled.methods.catalog import protocol_table
from refilled.training.loop import OptimConfig, fit

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


class ListBatches:
    """A fixed list of batches with the `set_epoch` / `len` the training loop uses."""

    def __init__(self, data):
        self.data = data

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        return iter(self.data)


# ------------------------------------------------------------------------------------------------
# The catalog is torch-free and complete
# ------------------------------------------------------------------------------------------------


def test_catalog_imports_no_torch():
    code = ("import sys; from refilled.methods import CATALOG; from refilled.experiments.profile import method_values;"
            "[e.resolve() for e in CATALOG.values()]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", list(CATALOG))
def test_every_entry_loads_and_declares_what_its_class_takes(name):
    entry = CATALOG[name]
    cls = entry.load()
    values = entry.resolve()
    assert set(values) == set(entry.hparams)
    for key, hp in entry.hparams.items():
        assert hp.meaning.strip(), f"{name}.{key} has no meaning"
    assert entry.starts_from is None or entry.starts_from in CATALOG
    assert entry.applies_to in ("any", "same-classes") and entry.scored_by in ("test_acc", "ncm_acc")
    assert set(entry.preset) <= set(entry.hparams) and set(entry.path) <= set(entry.hparams)
    import inspect
    params = inspect.signature(cls.__init__).parameters
    assert {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} == set(values), name


def test_docs_method_table_is_the_catalogs():
    page = (ROOT / "docs" / "cli.md").read_text()
    block = re.search(r"<!-- methods-table[^\n]*-->\n(.*?)<!-- /methods-table -->", page, re.S)
    assert block, "docs/cli.md has no methods-table block"
    assert block.group(1) == protocol_table(), "run: refilled methods --readme docs/cli.md"


# ------------------------------------------------------------------------------------------------
# --set: checked against the declaration; one line naming method, key and what is allowed
# ------------------------------------------------------------------------------------------------


def test_resolve_checks_keys_values_and_presets():
    stage1 = get("stage1")
    assert stage1.resolve({"k_hat": "5", "tau": "2"})["k_hat"] == 5
    with pytest.raises(ParamError, match=r"method stage1 has no hyper-parameter 'lam'; allowed keys: .*k_hat.*tau"):
        stage1.resolve({"lam": 1})
    with pytest.raises(ParamError, match=r"tau='-1' is not allowed; expected a number > 0"):
        stage1.resolve({"tau": "-1"})
    with pytest.raises(ParamError, match=r"weighting is fixed to 'constant' by method refilled-minus"):
        get("refilled-minus").resolve({"weighting": "confidence"})
    with pytest.raises(ParamError, match=r"unknown method 'nope'; the catalog has: student"):
        get("nope")


@pytest.mark.parametrize("sets,words", [
    (["--set", "lamda=2"], ["method refilled", "'lamda'", "allowed keys:", "lam", "tau", "weighting"]),
    (["--set", "tau=0"], ["method refilled", "tau='0'", "a number > 0"]),
    (["--set", "weighting=adaptive"], ["weighting='adaptive'", "confidence", "true-class", "constant", "none"]),
    (["--set", "lam"], ["--set 'lam': expected KEY=VALUE"]),
])
def test_train_refuses_bad_set_before_anything_is_written(tmp_path, sets, words):
    out = tmp_path / "run"
    rc, _, err = cli(["train", "--method", "refilled", "--split", tmp_path / "no-split.json", "--arch", "wrn-10-1",
                      "--teacher", tmp_path / "t.pt", "--init", tmp_path / "i.pt", "--epochs", 1, *sets,
                      "--out", out])
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("refilled train: error:"), err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_profile_methods_section_is_checked_against_the_declarations(tmp_path):
    import shutil

    from refilled.experiments.profile import ConfigError, load_profile

    base = tmp_path / "repo"
    shutil.copytree(ROOT / "workflow" / "schemas", base / "workflow" / "schemas")
    (base / "config").mkdir()
    text = (ROOT / "config" / "smoke.yaml").read_text()
    (base / "config" / "good.yaml").write_text(text + "methods:\n  stage1: {tau: 2}\n  rkd: {angle_weight: 10}\n"
                                             "  kd: {T: 3}\n")
    cfg = load_profile(base, "good")
    from refilled.experiments.profile import method_values
    assert method_values(cfg, "stage1")["tau"] == 2 and method_values(cfg, "rkd")["angle_weight"] == 10
    assert method_values(cfg, "refilled")["lam"] == cfg["lam"] and method_values(cfg, "kd")["T"] == 3
    for extra, words in [("methods:\n  stage1: {taus: 2}\n", ["methods.stage1", "'taus'"]),
                         ("methods:\n  stage1: {tau: -2}\n", ["methods.stage1.tau", "-2"]),
                         ("methods:\n  fitnets: {T: 4}\n", ["'fitnets'", "methods"]),   # not a catalog name
                         ("methods:\n  refilled: {lam: 4}\n", ["methods.refilled", "'lam'"])]:
        (base / "config" / "bad.yaml").write_text(text + extra)
        with pytest.raises(ConfigError) as info:
            load_profile(base, "bad")
        for w in words:
            assert w in str(info.value), (w, str(info.value))


# ------------------------------------------------------------------------------------------------
# Every method of the catalog: finite under bf16 autocast, exact resume
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_IDS)
def test_step_stays_finite_under_bf16_autocast_on_the_cpu(case):
    method = build_case(case, prepare_batches=batches(1, seed=9))
    method.train()
    x, y = batches(1)[0]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits, terms = method.loss(x, y)
    total = sum(terms.values())
    total.backward()
    assert torch.isfinite(logits.float()).all() and torch.isfinite(total.float())
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), case


@pytest.mark.parametrize("case", CASE_IDS)
def test_killed_run_resumes_to_the_same_weights(case, tmp_path):
    """Two epochs straight, against a run killed in epoch 2 (a new process would rebuild everything
    from the seed) and the same call again: it resumes after epoch 1 and ends bit-identical."""
    data = ListBatches(batches(3))
    cfg = OptimConfig(epochs=2, batch_size=8, lr=0.05)

    def run(run_dir):
        method = build_case(case, prepare_batches=batches(1, seed=9), seed=1)
        fit(method, data, lambda: {}, cfg, run_dir, CPU, 1, graph="off")
        return {k: v.clone() for k, v in method.state_dict().items()}

    straight = run(tmp_path / "straight")
    resumed = kill_then_resume(run, tmp_path / "resumed", cfg.epochs)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"{case}: {k}"


# ------------------------------------------------------------------------------------------------
# A new method is its file and one catalog line: a throw-away one through `refilled train` and a table
# ------------------------------------------------------------------------------------------------

THROWAWAY = '''
"""A throw-away method for the catalog test: CE plus a weighted logit-norm penalty."""
import torch.nn.functional as F

from refilled.methods.base import Method

HPARAMS = {"weight": ("float>=0", 0.5, "weight of the mean squared logit")}


class LogitPenalty(Method):
    def __init__(self, student, teacher, *, weight):
        super().__init__(student, teacher)
        self.weight = weight

    def loss(self, x, y):
        logits = self.student(x).logits
        return logits, {"ce": F.cross_entropy(logits.float(), y),
                        "penalty": self.weight * logits.float().pow(2).mean()}
'''


def test_a_throwaway_method_needs_only_its_file_and_a_catalog_line(tmp_path, monkeypatch):
    from fakedata import make_fashion_idx

    pkg = tmp_path / "mymethods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "penalty.py").write_text(textwrap.dedent(THROWAWAY))
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "data"
    make_fashion_idx(root, 6, 2)
    split = tmp_path / "split.json"
    assert cli(["split", "--dataset", "fashion-mnist", "--ratio", 0.5, "--seed", 0, "--classes-per-task", 2,
                "--out", split])[0] == 0
    common = ["--split", split, "--arch", "wrn-10-1", "--data-root", root, "--no-checksum", "--epochs", 1,
              "--batch-size", 4, "--device", "cpu"]
    teacher = tmp_path / "teacher"
    assert cli(["train", "--method", "student", "--task", "teacher", *common, "--out", teacher])[0] == 0

    entry = Entry("penalty", "mymethods.penalty:LogitPenalty", "Penalty")   # the one catalog line
    with registered(entry):
        assert "penalty" in protocol_table()
        rc, out, err = cli(["train", "--method", "penalty", *common, "--teacher", teacher / "model.pt",
                            "--set", "weight=2", "--out", tmp_path / "pen"])
        assert rc == 0, err
        summary = json.loads((tmp_path / "pen" / "summary.json").read_text())
        assert summary["method"] == "penalty" and summary["params"]["weight"] == 2.0
        assert "penalty" in (tmp_path / "pen" / "metrics.csv").read_text().splitlines()[0]
        rc, _, err = cli(["train", "--method", "penalty", *common, "--teacher", teacher / "model.pt",
                          "--set", "wieght=2", "--out", tmp_path / "bad"])
        assert rc == 2 and "method penalty has no hyper-parameter 'wieght'; allowed keys: weight" in err
        student = tmp_path / "student"
        assert cli(["train", "--method", "student", *common, "--out", student])[0] == 0
        rc, _, err = cli(["table", "--table", "2", "--ratios", "0.5", "--columns", "wrn-10-1",
                          "--methods", "student", "penalty", "--summaries", student / "summary.json",
                          tmp_path / "pen" / "summary.json", "--out", tmp_path / "t.csv",
                          "--long", tmp_path / "l.csv", "--markdown", tmp_path / "t.md"])
        assert rc == 0, err
        rows = (tmp_path / "t.csv").read_text().splitlines()
        assert rows[2].startswith("0.5,Penalty,") and "± n/a" in rows[2]
    assert "penalty" not in CATALOG


def test_a_same_classes_method_gets_a_dash_where_it_does_not_apply(tmp_path):
    from refilled.report.tables import NOT_APPLICABLE, write_table

    def summary(path, method, ratio, acc):
        path.write_text(json.dumps({"method": method, "task": "student", "arch": "wrn-10-1", "seed": 0,
                                    "split": {"ratio": ratio}, "params": {}, "test_acc": acc}))
        return path

    entry = Entry("same-only", "refilled.methods.student:Student", "SameOnly", teacher=False,
                  applies_to="same-classes")
    with registered(entry):
        paths = [summary(tmp_path / "s0.json", "student", 0.5, 0.5), summary(tmp_path / "s1.json", "student", 1.0, 0.6),
                 summary(tmp_path / "k1.json", "same-only", 1.0, 0.7)]
        write_table("2", paths, [0.5, 1.0], ["wrn-10-1"], ["student", "same-only"], None,
                    tmp_path / "t.csv", tmp_path / "l.csv", tmp_path / "t.md")
        rows = (tmp_path / "t.csv").read_text().splitlines()
        assert rows[2] == f"0.5,SameOnly,{NOT_APPLICABLE}" and rows[4] == "1,SameOnly,70.00 ± n/a"


# ------------------------------------------------------------------------------------------------
# Dropout (the authors' WRN, 0.3) inside the captured step and across a resume
# ------------------------------------------------------------------------------------------------


def _dropout_student(seed=0):
    from refilled.methods.student import Student
    from refilled.models import build_model

    torch.manual_seed(seed)
    return Student(build_model("wrn-10-1", 4, dropout=0.3))


def test_dropout_masks_change_from_step_to_step_under_the_emulated_capture():
    from refilled.training.step import TrainStep

    method = _dropout_student()
    seen = []
    real = method.loss

    def recording(x, y):
        logits, terms = real(x, y)
        seen.append(logits.detach().clone())
        return logits, terms

    method.loss = recording
    step = TrainStep(method, CPU, lr=0.0, graph="emulate")   # lr 0: the weights never move
    method.train()
    step.begin_epoch(0, 0.0)
    x, y = batches(1)[0]
    for _ in range(3):
        step.step(x, y)
    assert step.captures == 1
    replays = seen[-2:]                                       # the last two calls are replays of one batch
    assert not torch.equal(replays[0], replays[1]), "dropout drew the same mask twice"


def test_emulated_capture_with_dropout_equals_eager_exactly():
    from refilled.training.step import TrainStep

    data = batches(3)
    states = {}
    for mode in ("off", "emulate"):
        method = _dropout_student()
        torch.manual_seed(5)
        step = TrainStep(method, CPU, lr=0.05, graph=mode)
        method.train()
        step.begin_epoch(0, 0.05)
        for x, y in data:
            step.step(x, y)
        states[mode] = method.state_dict()
    for k in states["off"]:
        assert torch.equal(states["off"][k], states["emulate"][k]), k


def test_resumed_run_with_dropout_ends_on_the_same_weights(tmp_path):
    data = ListBatches(batches(3))
    cfg = OptimConfig(epochs=2, batch_size=8, lr=0.05)

    def run(run_dir):
        method = _dropout_student(seed=2)
        fit(method, data, lambda: {}, cfg, run_dir, CPU, 1, graph="emulate")
        return method.state_dict()

    straight = run(tmp_path / "a")
    resumed = kill_then_resume(run, tmp_path / "b", cfg.epochs)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
