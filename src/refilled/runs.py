"""One function per kind of run (teacher, stage 1, stage 2, baseline): load the split,
the data and the teacher, build the method, train it through `train.fit`, and write
`model.pt`, then `summary.json` last, so a summary's presence means the run finished."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refilled import __version__
from refilled.checkpoints import load_model, save_model
from refilled.data import load_dataset
from refilled.data.batches import Batches, task_split
from refilled.data.splits import SplitError, check_split
from refilled.evaluate import accuracy, forward_all, ncm_accuracy, true_class_probability
from refilled.io import CheckpointError, read_json, write_csv, write_json
from refilled.methods import CrossEntropy
from refilled.methods.distill import AML, RKD, ComparisonMatching, LocalDistillation, batch_centers
from refilled.models import build_model
from refilled.train import RESUME_FILE, OptimConfig, fit, resolve_device, run_fingerprint, set_cpu_threads

VARIANT_WEIGHTING = {"refilled": "adaptive", "refilled-minus": "constant", "refilled-emb": "none"}
BASELINES = ("student", "rkd", "aml")


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
    params: dict = field(default_factory=dict)  # method-specific settings, recorded and resume-checked


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
        train = task_split(self.dataset.train, self.classes, spec.per_class, spec.seed)
        test = task_split(self.dataset.test, self.classes)
        mk = lambda s, bs, aug, seed=0: Batches(s, self.dataset, bs, aug, self.device, seed, num_workers=spec.num_workers)
        self.train = mk(train, spec.batch_size, True, spec.seed)
        self.train_plain = mk(train, 512, False)   # un-augmented, for class means and λ_i
        self.test = mk(test, 512, False)

    def load_teacher(self, path: Path) -> torch.nn.Module:
        teacher, meta = load_model(path, num_classes=len(self.split["teacher_classes"]), device=self.device)
        if list(meta.get("classes", [])) != list(self.split["teacher_classes"]):
            raise CheckpointError(f"{path}: teacher was trained on classes {meta.get('classes')}, but split "
                                  f"{self.spec.split} has teacher classes {self.split['teacher_classes']}")
        return teacher.eval().requires_grad_(False)

    def new_student(self) -> torch.nn.Module:
        torch.manual_seed(self.spec.seed)
        return build_model(self.spec.arch, len(self.classes))

    def test_accuracy(self, model) -> dict:
        return {"test_acc": accuracy(model, self.test, self.device)}

    def ncm(self, model) -> dict:
        _, tr_emb, tr_y = forward_all(model, self.train_plain, self.device)
        _, te_emb, te_y = forward_all(model, self.test, self.device)
        return {"ncm_acc": ncm_accuracy(tr_emb, tr_y, te_emb, te_y, len(self.classes))}

    def fit(self, method, evaluate, kind: str, summary: dict, finish=None) -> dict:
        """Train, save the model, run `finish()` (extra outputs and metrics), write summary.json."""
        spec = self.spec
        cfg = OptimConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                          weight_decay=spec.weight_decay, schedule=spec.schedule, eval_every=spec.eval_every,
                          extra={"kind": kind, "arch": spec.arch, "split": self.split, "per_class": spec.per_class,
                                 **spec.params})
        finished = self._finished_run(run_fingerprint(cfg, spec.seed))
        if finished is not None:
            return finished
        began = time.time()
        last = fit(method, self.train, evaluate, cfg, spec.out, self.device, spec.seed)
        save_model(spec.out / "model.pt", method.student, spec.arch, self.classes)
        extra = finish() if finish else {}
        full = {
            "kind": kind, "arch": spec.arch, "task": self.task, **summary,
            **{k: v for k, v in last.items() if k.endswith("_acc")}, **extra,
            "split": {"path": str(spec.split), **self.split}, "seed": spec.seed, "epochs": spec.epochs,
            "params": spec.params,
            "optim": {"batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                      "schedule": cfg.schedule},
            "data": {"root": str(spec.data_root), "per_class": spec.per_class, "train": self.train.split.describe(),
                     "test": self.test.split.describe()},
            "profile": spec.profile, "seconds": round(time.time() - began, 1), **environment(self.device),
            "fingerprint": run_fingerprint(cfg, spec.seed),
        }
        write_json(spec.out / "summary.json", full)
        (spec.out / RESUME_FILE).unlink(missing_ok=True)
        return full


    def _finished_run(self, fingerprint: dict) -> dict | None:
        """The summary of a finished run with this configuration; refuse one with another."""
        path = self.spec.out / "summary.json"
        if not path.exists():
            return None
        summary = read_json(path)
        if summary.get("fingerprint") != json.loads(json.dumps(fingerprint)):
            raise CheckpointError(f"{self.spec.out} holds a finished run with another configuration; "
                                  f"delete the directory or choose another --out")
        print(f"{self.spec.out}: finished already, nothing to do")
        return summary


def environment(device) -> dict:
    return {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "refilled": __version__, "host": platform.node(), "threads": torch.get_num_threads()}


def train_teacher(spec: RunSpec) -> dict:
    ctx = Context(spec, "teacher")
    model = ctx.new_student()
    return ctx.fit(CrossEntropy(model), lambda: ctx.test_accuracy(model), "teacher", {"method": "ce"})


def train_stage1(spec: RunSpec, teacher_path: Path, k_hat: int | None, tau: float = 4.0, margin: float = 0.2,
                 scale: float = 1000.0) -> dict:
    """Comparison matching; the student's embedding only. Logs NCM accuracy per epoch."""
    spec.params = {"teacher": str(teacher_path), "k_hat": k_hat, "tau": tau, "margin": margin, "scale": scale}
    ctx = Context(spec, "student")
    student = ctx.new_student()
    method = ComparisonMatching(student, ctx.load_teacher(teacher_path), k_hat, tau, margin, scale)
    return ctx.fit(method, lambda: ctx.ncm(student), "stage1", {"method": "stage1", **spec.params})




def train_stage2(spec: RunSpec, teacher_path: Path, init_path: Path, variant: str, lam: float = 2.0,
                 tau: float = 2.0, centers: str = "fixed") -> dict:
    """Local classifier distillation from the stage-1 student; writes lambda_i.csv for Figure 3."""
    if variant not in VARIANT_WEIGHTING:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANT_WEIGHTING)}")
    if centers not in ("fixed", "batch"):
        raise ValueError(f"centers must be 'fixed' or 'batch', got {centers!r}")
    spec.params = {"teacher": str(teacher_path), "init": str(init_path), "variant": variant, "lam": lam,
                   "tau": tau, "centers": centers}
    ctx = Context(spec, "student")
    teacher = ctx.load_teacher(teacher_path)
    student, _ = load_model(init_path, arch=spec.arch, num_classes=len(ctx.classes))
    _, t_emb, t_labels = forward_all(teacher, ctx.train_plain, ctx.device)  # un-augmented student images
    fixed = batch_centers(t_emb, t_labels, len(ctx.classes))
    method = LocalDistillation(student, teacher, fixed if centers == "fixed" else None,
                               VARIANT_WEIGHTING[variant], lam, tau)

    def finish():
        write_lambda_dump(ctx, t_emb, t_labels, fixed, method, spec.out / "lambda_i.csv")
        return ctx.ncm(student)

    return ctx.fit(method, lambda: ctx.test_accuracy(student), "stage2", {"method": variant, **spec.params}, finish)


def write_lambda_dump(ctx: Context, emb, y, centers, method: LocalDistillation, path: Path) -> None:
    """λ_i of every training instance from its teacher embedding, all student classes as the local set."""
    p_true = true_class_probability(emb, centers, y, method.tau)
    scale = {"adaptive": method.lam * p_true, "constant": torch.full_like(p_true, method.lam),
             "none": torch.zeros_like(p_true)}[method.weighting]
    seen = set(ctx.split["teacher_classes"])
    rows = [{"index": int(i), "label": int(label), "class": ctx.classes[label], "seen": int(ctx.classes[label] in seen),
             "p_teacher_true": round(float(p), 6), "lambda_i": round(float(lam_i), 6)}
            for i, label, p, lam_i in zip(ctx.train_plain.split.indices.tolist(), y.tolist(), p_true, scale)]
    write_csv(path, rows, list(rows[0]))


def train_baseline(spec: RunSpec, method_name: str, teacher_path: Path | None) -> dict:
    """student (CE only), rkd or aml, from scratch, with the stage-2 recipe."""
    if method_name not in BASELINES:
        raise ValueError(f"unknown baseline {method_name!r}; choose from {', '.join(BASELINES)}")
    if method_name != "student" and teacher_path is None:
        raise ValueError(f"baseline {method_name} needs --teacher")
    spec.params = {"teacher": str(teacher_path) if method_name != "student" else None}
    ctx = Context(spec, "student")
    student = ctx.new_student()
    if method_name == "student":
        method = CrossEntropy(student)
    else:
        teacher = ctx.load_teacher(teacher_path)
        method = RKD(student, teacher) if method_name == "rkd" else AML(student, teacher)
    return ctx.fit(method, lambda: ctx.test_accuracy(student), "baseline", {"method": method_name, **spec.params},
                   lambda: ctx.ncm(student))
