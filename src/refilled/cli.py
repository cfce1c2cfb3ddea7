"""`refilled <command>`: every step of the workflow is one of these calls."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from refilled import __version__


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default="data/raw", help="directory holding the datasets (default: data/raw)")
    p.add_argument("--per-class", type=int, default=None,
                   help="training images per class, a seeded subsample (default: all)")
    p.add_argument("--no-checksum", action="store_true", help="skip checksum verification of the dataset files")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of weights, subsample, data order and augmentation")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=("multistep", "cosine"), default="multistep",
                   help="multistep: x0.2 at 50%%, 70%%, 90%% of the epochs; cosine: down to 0.1*lr")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for file datasets (CUB)")
    p.add_argument("--profile", default="manual", help="profile name recorded in summary.json")
    p.add_argument("--out", required=True, type=Path, help="run directory (model.pt, metrics.csv, summary.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refilled", description=__doc__)
    parser.add_argument("--version", action="version", version=f"refilled {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="obtain or verify a dataset", description="Obtain or verify a dataset.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_sub.add_parser("fetch", help="put Fashion-MNIST under ROOT (from the Debian package or torchvision)",
                                description="Copy Fashion-MNIST's official IDX files under ROOT/fashion-mnist, from "
                                            "the Debian package dataset-fashion-mnist if installed, else torchvision's download.")
    fetch.add_argument("--dataset", choices=("fashion-mnist",), default="fashion-mnist")
    fetch.add_argument("--root", default="data/raw")
    fetch.set_defaults(func=cmd_data_fetch)
    check = data_sub.add_parser("check", help="verify a dataset on disk and print a summary",
                                description="Verify files, checksums (where known), counts, label ranges and that "
                                            "images decode. Writes nothing; exits non-zero on any problem.")
    check.add_argument("--dataset", required=True, choices=("fashion-mnist", "cifar100", "cub200"))
    check.add_argument("--root", required=True)
    check.add_argument("--no-checksum", action="store_true")
    check.add_argument("--decode-limit", type=int, default=None, help="decode at most this many images per split")
    check.set_defaults(func=cmd_data_check)

    split = sub.add_parser("split", help="write a class-overlap split (teacher and student classes)",
                           description="Teacher classes pi[0:h], student classes pi[h(1-r):h(2-r)] of a seeded "
                                       "class permutation pi; see docs in the README.")
    split.add_argument("--dataset", required=True, choices=("fashion-mnist", "cifar100", "cub200"))
    split.add_argument("--ratio", required=True, type=float, help="overlap |C & C'| / |C|")
    split.add_argument("--seed", required=True, type=int)
    split.add_argument("--classes-per-task", type=int, default=None, help="h (default: half the classes)")
    split.add_argument("--out", required=True, type=Path)
    split.set_defaults(func=cmd_split)

    teacher = sub.add_parser("train-teacher", help="train a teacher on the teacher classes of a split",
                             description="Train a teacher with cross-entropy on the split's teacher classes.")
    teacher.add_argument("--split", required=True, type=Path, help="split JSON written by `refilled split`")
    teacher.add_argument("--arch", required=True, help="e.g. wrn-40-2, wrn-16-2, mobilenet-1.0")
    _add_train_args(teacher)
    teacher.set_defaults(func=cmd_train_teacher)

    ncm = sub.add_parser("ncm", help="NCM accuracy of a model's embedding on one task of a split",
                         description="Nearest-class-mean accuracy (cosine, class means from the training images, "
                                     "no augmentation) of a trained model's or a random network's embedding.")
    ncm.add_argument("--split", required=True, type=Path)
    ncm.add_argument("--task", choices=("student", "teacher"), default="student")
    src = ncm.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="model.pt of a finished run")
    src.add_argument("--random-init", metavar="ARCH", help="a randomly initialised network of this architecture")
    _add_data_args(ncm)
    ncm.add_argument("--seed", type=int, default=0)
    ncm.add_argument("--device", default="auto")
    ncm.add_argument("--out", type=Path, help="write the result as JSON here")
    ncm.set_defaults(func=cmd_ncm)
    return parser


def cmd_data_fetch(args) -> int:
    from refilled.data import obtain_fashion_mnist

    path = obtain_fashion_mnist(args.root)
    print(f"Fashion-MNIST ready in {path}")
    return 0


def cmd_data_check(args) -> int:
    from refilled.data.check import check_dataset, format_summary

    print(format_summary(check_dataset(args.dataset, args.root, verify_checksums=not args.no_checksum,
                                       decode_limit=args.decode_limit)))
    return 0


def cmd_split(args) -> int:
    from refilled.data.splits import make_split
    from refilled.io import write_json

    split = make_split(args.dataset, args.ratio, args.seed, args.classes_per_task)
    write_json(args.out, split)
    print(f"{args.out}: teacher {split['teacher_classes']} student {split['student_classes']}")
    return 0


def _read_split(path: Path) -> dict:
    from refilled.data.splits import SplitError, check_split
    from refilled.io import read_json

    try:
        return check_split(read_json(path), str(path))
    except FileNotFoundError:
        raise SplitError(f"split file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise SplitError(f"{path}: not valid JSON ({exc})") from None


def _task_batches(dataset, split: dict, task: str, args, device, batch_size: int, train_aug: bool):
    """Train and test Batches of one task ('teacher' or 'student') of a split."""
    from refilled.data.batches import Batches, task_split

    classes = split[f"{task}_classes"]
    train = task_split(dataset.train, classes, args.per_class, args.seed)
    test = task_split(dataset.test, classes)
    workers = getattr(args, "num_workers", 0)
    return (Batches(train, dataset, batch_size, train_aug, device, args.seed, num_workers=workers),
            Batches(test, dataset, 512, False, device, num_workers=workers))


def _environment(device) -> dict:
    import torch

    return {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "refilled": __version__, "host": platform.node(), "threads": torch.get_num_threads()}


def cmd_train_teacher(args) -> int:
    import torch

    from refilled.checkpoints import save_model
    from refilled.data import load_dataset
    from refilled.io import write_json
    from refilled.methods import CrossEntropy
    from refilled.models import build_model
    from refilled.train import OptimConfig, fit, resolve_device, set_cpu_threads

    set_cpu_threads()
    device = resolve_device(args.device)
    split = _read_split(args.split)
    dataset = load_dataset(split["dataset"], args.data_root, verify_checksums=not args.no_checksum)
    train_b, test_b = _task_batches(dataset, split, "teacher", args, device, args.batch_size, train_aug=True)
    cfg = OptimConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      schedule=args.schedule, extra={"arch": args.arch, "split": split, "per_class": args.per_class})
    torch.manual_seed(args.seed)
    model = build_model(args.arch, len(split["teacher_classes"]))
    began = time.time()
    last = fit(CrossEntropy(model), train_b, test_b, cfg, args.out, device, args.seed)
    save_model(args.out / "model.pt", model, args.arch, split["teacher_classes"])
    summary = {
        "kind": "teacher", "method": "ce", "arch": args.arch, "task": "teacher",
        "test_acc": last["test_acc"], "train_acc": last["train_acc"],
        "split": {"path": str(args.split), **split}, "seed": args.seed, "epochs": args.epochs,
        "optim": {k: getattr(cfg, k) for k in ("batch_size", "lr", "weight_decay", "schedule")},
        "data": {"root": str(args.data_root), "per_class": args.per_class, "train": train_b.split.describe(),
                 "test": test_b.split.describe()},
        "profile": args.profile, "seconds": round(time.time() - began, 1), **_environment(device),
    }
    write_json(args.out / "summary.json", summary)
    (args.out / "resume.pt").unlink(missing_ok=True)
    print(f"{args.out}: teacher {args.arch} test accuracy {last['test_acc']:.4f} on classes {split['teacher_classes']}")
    return 0


def cmd_ncm(args) -> int:
    import torch

    from refilled.checkpoints import load_model
    from refilled.data import load_dataset
    from refilled.evaluate import forward_all, ncm_accuracy
    from refilled.io import write_json
    from refilled.models import build_model
    from refilled.train import resolve_device, set_cpu_threads

    set_cpu_threads()
    device = resolve_device(args.device)
    split = _read_split(args.split)
    dataset = load_dataset(split["dataset"], args.data_root, verify_checksums=not args.no_checksum)
    train_b, test_b = _task_batches(dataset, split, args.task, args, device, 512, train_aug=False)
    if args.model:
        model, meta = load_model(args.model, device=device)
        source = {"model": str(args.model), "arch": meta["arch"], "trained_on": meta.get("classes")}
    else:
        torch.manual_seed(args.seed)
        model = build_model(args.random_init, len(split[f"{args.task}_classes"])).to(device)
        source = {"random_init": args.random_init, "seed": args.seed}
    tr = forward_all(model, train_b, device)
    te = forward_all(model, test_b, device)
    acc = ncm_accuracy(tr[1], tr[2], te[1], te[2], len(split[f"{args.task}_classes"]))
    result = {"ncm_acc": acc, "task": args.task, "classes": split[f"{args.task}_classes"], **source,
              "split": str(args.split), "per_class": args.per_class, "n_train": len(tr[2]), "n_test": len(te[2])}
    if args.out:
        write_json(args.out, result)
    print(f"NCM accuracy on the {args.task} classes {result['classes']}: {acc:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from refilled.data.splits import SplitError
    from refilled.io import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        from refilled.data import DataError
    except ImportError:  # pragma: no cover - the data package always defines it
        DataError = RuntimeError
    try:
        return args.func(args)
    except (DataError, SplitError, CheckpointError, ValueError) as exc:
        print(f"refilled {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
