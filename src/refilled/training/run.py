"""One training run of any catalog method: load the split, the data, the teacher and the
starting model the catalog asks for, build the method, train it through `train.fit`, and
write `model.pt`, then `summary.json` last, so a summary's presence means the run finished."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from refilled import __version__
from refilled.training import finished as finished_mod
from refilled.training.checkpoints import load_model, save_model
from refilled.data import load_dataset
from refilled.data.batches import Batches, balanced_split, task_split, train_val_split
from refilled.data.splits import SplitError, check_split
from refilled.evaluate import accuracy, forward_all, harmonic_mean, joint_accuracy, ncm_accuracy, reference_scores, top1
from refilled.io import CheckpointError, read_json, save_tensors, write_json
from refilled.methods import catalog
from refilled.training.phases import Phases, job_start_time
from refilled.models import build_model
from refilled.training.loop import RESUME_FILE, RUN_FORMAT, OptimConfig, fit, resolve_device, run_fingerprint, set_cpu_threads


JOINT_HEAD_FILE = "old_head.pt"   # the joint head's old-class Linear (weight, bias), beside model.pt


def eval_batch_size(device: torch.device) -> int:
    """Images per forward pass where nothing trains (evaluation, class means, a teacher's fixed
    outputs). Each image's outputs are the same bits at any batch size; on one CPU core batches
    of 128 ran WRN-(16,1) about 2x faster than 512 (cache), on a GPU larger batches are faster."""
    return 512 if device.type == "cuda" else 128


@dataclass
class RunSpec:
    """What every training run needs; the CLI fills it from its flags."""

    split: Path
    arch: str
    out: Path
    epochs: int
    seed: int = 0
    data_root: Path = Path("data/raw")
    per_class: int | None = None
    verify_checksums: bool = True
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    device: str = "auto"
    num_workers: int = 0
    eval_every: int = 1
    profile: str = "manual"
    dropout: float = 0.0          # WRN dropout between the two convolutions of every block (authors: 0.3)
    milestones: tuple | None = None   # multistep: fractions of the epochs (None: OptimConfig's 0.5, 0.7, 0.9)
    gamma: float = 0.2                # multistep: the factor at each milestone
    val_per_class: int | None = None  # held-out training images per class that select an epoch (reported beside the final)
    joint: "JointSpec | None" = None  # a second head over the teacher's other classes (Table H); None: a plain run


@dataclass(frozen=True)
class JointSpec:
    """The joint head of a run (`refilled.methods.joint`): the `old` term's weight and
    temperature, and the balanced test set's images per class (None: as many as the rarest
    class of C' ∪ C has). All three enter the run's fingerprint."""

    weight: float = 1.0
    T: float = 2.0
    test_per_class: int | None = None

    def __post_init__(self):
        if not self.weight > 0:
            raise ValueError(f"joint head: weight must be > 0, got {self.weight}")
        if not self.T > 0:
            raise ValueError(f"joint head: T must be > 0, got {self.T}")
        if self.test_per_class is not None and self.test_per_class < 1:
            raise ValueError(f"joint head: test_per_class must be >= 1, got {self.test_per_class}")


def read_split(path: Path) -> dict:
    try:
        return check_split(read_json(path), str(path))
    except FileNotFoundError:
        raise SplitError(f"split file not found: {path}") from None
    except ValueError as exc:
        if isinstance(exc, SplitError):
            raise
        raise SplitError(f"{path}: not a valid split file ({exc})") from None


class Context:
    """The split, the dataset and the train/test batches of one task."""

    def __init__(self, spec: RunSpec, task: str):
        set_cpu_threads()
        self.spec, self.task = spec, task
        self.device = resolve_device(spec.device)
        self.split = read_split(spec.split)
        self.classes = self.split[f"{task}_classes"]
        self.dataset = load_dataset(self.split["dataset"], spec.data_root, verify_checksums=spec.verify_checksums)
        if spec.val_per_class:
            train, val = train_val_split(self.dataset.train, self.classes, spec.per_class, spec.val_per_class, spec.seed)
        else:
            train, val = task_split(self.dataset.train, self.classes, spec.per_class, spec.seed), None
        test = task_split(self.dataset.test, self.classes)
        mk = lambda s, bs, aug, seed=0: Batches(s, self.dataset, bs, aug, self.device, seed, num_workers=spec.num_workers)
        plain = eval_batch_size(self.device)
        self.train = mk(train, spec.batch_size, True, spec.seed)
        self.train_plain = mk(train, plain, False)   # un-augmented, for class means and λ_i
        self.test = mk(test, plain, False)
        self.val = None if val is None else mk(val, plain, False)
        self._last_test = None   # (model, its test-set forward) of the latest evaluation

    def load_teacher(self, path: Path) -> torch.nn.Module:
        teacher, meta = load_model(path, num_classes=len(self.split["teacher_classes"]), device=self.device)
        if list(meta.get("classes", [])) != list(self.split["teacher_classes"]):
            raise CheckpointError(f"{path}: teacher was trained on classes {meta.get('classes')}, but split "
                                  f"{self.spec.split} has teacher classes {self.split['teacher_classes']}")
        return teacher.eval().requires_grad_(False)

    def new_student(self) -> torch.nn.Module:
        torch.manual_seed(self.spec.seed)
        return build_model(self.spec.arch, len(self.classes), dropout=self.spec.dropout)

    def test_forward(self, model, reuse: bool = False):
        """(logits, embeddings, labels) of the test set; `reuse`: those of the latest evaluation
        of this model, if there was one (the caller knows that nothing trained since)."""
        if reuse and self._last_test is not None and self._last_test[0] is model:
            out = self._last_test[1]
        else:
            out = forward_all(model, self.test, self.device)
        self._last_test = (model, out)
        return out

    def test_accuracy(self, model, on_val: bool = False) -> dict:
        logits, _, labels = self.test_forward(model)
        out = {"test_acc": top1(logits, labels)}
        if on_val and self.val is not None:
            out = {"val_acc": accuracy(model, self.val, self.device), **out}
        return out

    def ncm(self, model, on_val: bool = False, reuse_test: bool = False) -> dict:
        _, tr_emb, tr_y = forward_all(model, self.train_plain, self.device)
        _, te_emb, te_y = self.test_forward(model, reuse=reuse_test)
        out = {"ncm_acc": ncm_accuracy(tr_emb, tr_y, te_emb, te_y, len(self.classes))}
        if on_val and self.val is not None:
            _, va_emb, va_y = forward_all(model, self.val, self.device)
            out = {"val_ncm_acc": ncm_accuracy(tr_emb, tr_y, va_emb, va_y, len(self.classes)), **out}
        return out

    def old_classes(self) -> list[int]:
        """C' \\ C: the teacher's classes the student does not have, in the teacher's order."""
        return [c for c in self.split["teacher_classes"] if c not in self.classes]

    def joint_eval(self, student, per_class: int | None, old_logits=None, teacher=None) -> dict:
        """Acc_C', Acc_C and H on the balanced test set of C' ∪ C (seeded by the run's seed):
        the joint head's [old_logits(embedding), student logits] or, given `teacher`, the
        training-free reference [softmax teacher over C', softmax student over C]."""
        old = self.old_classes()
        split, record = balanced_split(self.dataset.test, old, self.classes, per_class, self.spec.seed)
        batches = Batches(split, self.dataset, eval_batch_size(self.device), False, self.device,
                          num_workers=self.spec.num_workers)
        logits, emb, joint_y = forward_all(student, batches, self.device)
        labels = torch.tensor(old + self.classes)[joint_y]
        if teacher is None:
            with torch.no_grad():
                old_scores, new_scores = old_logits(emb.to(self.device)).float().cpu(), logits
            old_cols = old
        else:
            t_logits, _, _ = forward_all(teacher, batches, self.device)
            old_scores, new_scores = reference_scores(t_logits, logits)
            old_cols = self.split["teacher_classes"]
        acc_old, acc_new = joint_accuracy(old_scores, new_scores, labels, old_cols, self.classes)
        return {"acc_old": acc_old, "acc_new": acc_new, "H": harmonic_mean(acc_old, acc_new), "test": record}

    def val_selected(self) -> dict:
        """The epoch with the best validation score (the first of ties) and its test score, from
        metrics.csv; the reported number stays the final epoch's."""
        if self.val is None:
            return {}
        import csv

        with open(self.spec.out / "metrics.csv", encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(f) if any(r.get(k) for k in ("val_acc", "val_ncm_acc"))]
        key = "val_acc" if rows[0].get("val_acc") else "val_ncm_acc"
        best = max(rows, key=lambda r: (float(r[key]), -int(r["epoch"])))
        metric = "ncm_acc" if key == "val_ncm_acc" else "test_acc"
        return {"val_selected": {"epoch": int(best["epoch"]), key: float(best[key]), metric: float(best[metric]),
                                 "per_class": self.spec.val_per_class,
                                 "val": self.val.split.describe()}}

    def fit(self, method, method_name: str, params: dict, evaluate, finish, phases: Phases | None = None) -> dict:
        """Prepare the method, train, save the model, run `finish()` (extra outputs and
        metrics), write summary.json with the job's `phases`; a finished run with this
        configuration is returned as is."""
        phases = Phases() if phases is None else phases
        spec = self.spec
        cfg = OptimConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                          weight_decay=spec.weight_decay, schedule=spec.schedule, gamma=spec.gamma,
                          eval_every=1 if self.val is not None else spec.eval_every,   # selection needs every epoch
                          **({"milestones": tuple(spec.milestones)} if spec.milestones else {}),
                          extra={"method": method_name, "task": self.task, "arch": spec.arch, "split": self.split,
                                 "per_class": spec.per_class, "dropout": spec.dropout,
                                 "val_per_class": spec.val_per_class, "params": params,
                                 **({"joint": asdict(spec.joint)} if spec.joint else {})})
        finished = self._finished_run(run_fingerprint(cfg, spec.seed))
        if finished is not None:
            return finished
        began = time.time()
        with phases("teacher"):   # the method's preparation: class centres from the teacher, ...
            method.prepare(self)
        last = fit(method, self.train, evaluate, cfg, spec.out, self.device, spec.seed, phases=phases)
        with phases("writing"):
            save_model(spec.out / "model.pt", method.student, spec.arch, self.classes)
        with phases("evaluation"):
            extra = {**finish(), **self.val_selected()}
        full = {
            "method": method_name, "task": self.task, "arch": spec.arch, "params": params,
            **{k: v for k, v in last.items() if k.endswith("_acc")}, **extra,
            "split": {"path": str(spec.split), **self.split}, "seed": spec.seed, "epochs": spec.epochs,
            "dropout": spec.dropout,
            "optim": {"batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                      "schedule": cfg.schedule, "milestones": list(cfg.milestones),
                      "gamma": cfg.gamma},
            "data": {"root": str(spec.data_root), "per_class": spec.per_class, "train": self.train.split.describe(),
                     "test": self.test.split.describe()},
            "profile": spec.profile, "seconds": round(time.time() - began, 1), **environment(self.device),
            "steps": last["steps"],    # a record of how the steps ran (graph or eager), not configuration
            "phases": phases.record(),   # seconds per phase of this job (refilled.training.phases), not configuration
            "fingerprint": run_fingerprint(cfg, spec.seed),
        }
        write_json(spec.out / "summary.json", full)
        finished_mod.archive(spec.out)   # hard links in .finished/: survives --rerun-incomplete (refilled.training.finished)
        (spec.out / RESUME_FILE).unlink(missing_ok=True)
        return full

    def _finished_run(self, fingerprint: dict) -> dict | None:
        """The summary of a finished run with this configuration; refuse one with another."""
        path = self.spec.out / "summary.json"
        if not path.exists():
            return finished_mod.restore(self.spec.out, fingerprint)   # outputs deleted after the run finished
        summary = read_json(path)
        old = summary.get("fingerprint", {}).get("format")
        if old != RUN_FORMAT:
            raise CheckpointError(f"{self.spec.out} holds a run written by an older refilled (run format {old or 1}, "
                                  f"this version writes format {RUN_FORMAT}); it is neither reused nor retrained: "
                                  f"delete the directory to train it again, or choose another --out")
        if summary.get("fingerprint") != json.loads(json.dumps(fingerprint)):
            raise CheckpointError(f"{self.spec.out} holds a finished run with another configuration; "
                                  f"delete the directory or choose another --out")
        print(f"{self.spec.out}: finished already, nothing to do")
        return summary


def environment(device) -> dict:
    return {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "refilled": __version__, "host": platform.node(), "threads": torch.get_num_threads()}


def train(spec: RunSpec, method_name: str, teacher_path: Path | None = None, init_path: Path | None = None,
          overrides: dict | None = None, task: str = "student") -> dict:
    """Train catalog method `method_name` on the split's `task` classes (the teacher is the
    Student method on the teacher task). `overrides` are `--set` values, checked against the
    method's HPARAMS; the resolved values, the teacher and the init are in the fingerprint."""
    entry = catalog.get(method_name)
    values = entry.resolve(overrides)
    joint = spec.joint
    needs_teacher = entry.teacher or joint is not None   # the joint head learns from the teacher's own head
    if needs_teacher and teacher_path is None:
        raise ValueError(f"method {method_name}{' with a joint head' if joint else ''} needs --teacher "
                         "(a teacher run's model.pt)")
    if not needs_teacher and teacher_path is not None:
        raise ValueError(f"method {method_name} uses no teacher; drop --teacher (or add --joint-head)")
    if joint is not None and task != "student":
        raise ValueError("a joint head belongs to a student run (--task student)")
    if joint is not None and entry.scored_by != "test_acc":
        raise ValueError(f"method {method_name} trains no head over C (scored by {entry.scored_by}); the joint "
                         "head joins one: add it to a run of a method scored by test_acc")
    if entry.starts_from and init_path is None:
        raise ValueError(f"method {method_name} starts from a {entry.starts_from} run: give --init (its model.pt)")
    if not entry.starts_from and init_path is not None:
        raise ValueError(f"method {method_name} trains from scratch; drop --init")
    phases = Phases(job_start_time())
    phases.end_startup()
    with phases("data"):
        ctx = Context(spec, task)
    if task == "student" and not entry.applies(ctx.split["teacher_classes"], ctx.classes):
        raise ValueError(f"method {method_name} needs teacher and student on the same classes; split {spec.split} "
                         f"has teacher {ctx.split['teacher_classes']} and student {ctx.classes}")
    with phases("teacher"):   # the teacher and the starting model
        teacher = ctx.load_teacher(teacher_path) if needs_teacher else None
        if init_path is not None:
            student, _ = load_model(init_path, arch=spec.arch, num_classes=len(ctx.classes), dropout=spec.dropout)
        else:
            student = ctx.new_student()
    method = entry.build(student, teacher if entry.teacher else None, values)
    if joint is not None:
        from refilled.methods.joint import JointHead

        old_index = [ctx.split["teacher_classes"].index(c) for c in ctx.old_classes()]
        method = JointHead(method, teacher, old_index, joint.weight, joint.T, spec.seed)
    params = {**values, "teacher": None if teacher_path is None else str(teacher_path),
              "init": None if init_path is None else str(init_path)}
    scored_by_test = entry.scored_by == "test_acc"

    def evaluate():
        return ctx.test_accuracy(student, on_val=True) if scored_by_test else ctx.ncm(student, on_val=True)

    def finish():
        extra = method.finish(ctx)
        if task == "student" and scored_by_test:
            # fit's last act was evaluate() after the last epoch: its test-set forward is this model's
            extra.update(ctx.ncm(student, reuse_test=True))
        if joint is not None:
            if method.old_head is not None:
                save_tensors(spec.out / JOINT_HEAD_FILE, {k: v.detach().cpu() for k, v in method.old_head.state_dict().items()})
            extra["joint"] = {**asdict(joint), "old_classes": ctx.old_classes(),
                              **ctx.joint_eval(student, joint.test_per_class, old_logits=method.old_logits)}
        return extra

    return ctx.fit(method, method_name, params, evaluate, finish, phases)


def joint_reference(spec: RunSpec, teacher_path: Path, student_path: Path) -> dict:
    """The training-free joint model of a plain student run: the teacher's head over C' and the
    student's head over C, each softmaxed, concatenated (shared classes from the student),
    scored on the balanced test set of `spec.seed` (the one the joint-head runs of that seed
    use). Writes `spec.out/summary.json` (method "reference"); nothing is trained."""
    ctx = Context(spec, "student")
    teacher = ctx.load_teacher(teacher_path)
    student, meta = load_model(student_path, num_classes=len(ctx.classes), device=ctx.device)
    if list(meta.get("classes", [])) != list(ctx.classes):
        raise CheckpointError(f"{student_path}: student was trained on classes {meta.get('classes')}, but split "
                              f"{spec.split} has student classes {ctx.classes}")
    per_class = spec.joint.test_per_class if spec.joint else None
    began = time.time()
    result = ctx.joint_eval(student, per_class, teacher=teacher)
    summary = {"method": "reference", "task": "student", "arch": meta["arch"],
               "params": {"teacher": str(teacher_path), "student": str(student_path)},
               "joint": {"test_per_class": per_class, "old_classes": ctx.old_classes(), **result},
               "split": {"path": str(spec.split), **ctx.split}, "seed": spec.seed,
               "data": {"root": str(spec.data_root)}, "profile": spec.profile,
               "seconds": round(time.time() - began, 1), **environment(ctx.device)}
    write_json(spec.out / "summary.json", summary)
    return summary
