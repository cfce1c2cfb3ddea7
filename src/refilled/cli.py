"""`refilled <command>`: every step of the workflow is one of these calls."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refilled import __version__


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default="data/raw", help="directory holding the datasets (default: data/raw)")
    p.add_argument("--per-class", type=int, default=None,
                   help="training images per class, a seeded subsample (default: all)")
    p.add_argument("--no-checksum", action="store_true", help="skip checksum verification of the dataset files")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", required=True, type=Path, help="split JSON written by `refilled split`")
    p.add_argument("--arch", required=True,
                   help="ours: wrn-DEPTH-WIDTH, mobilenet-WIDTH (e.g. wrn-40-2, mobilenet-0.75); the authors' "
                        "networks layer for layer: wrn-authors-40-2, mobilenet-authors-1.0")
    _add_data_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of weights, subsample, data order and augmentation")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--milestones", type=float, nargs="+", default=None, metavar="F",
                   help="multistep: x gamma at these fractions of the epochs (default 0.5 0.7 0.9)")
    p.add_argument("--gamma", type=float, default=0.2,
                   help="multistep: the factor at each milestone (default 0.2, the authors'; Table 3's recipe: 0.1)")
    p.add_argument("--schedule", choices=("multistep", "cosine"), default=None,
                   help="multistep: x0.2 at 50%%, 70%%, 90%% of the epochs; cosine: down to 0.1*lr "
                        "(default: the method's recipe, cosine for stage 1, multistep otherwise)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="hold out this many training images per class (seeded) to select an epoch, reported "
                        "beside the final one in summary.json (evaluation then runs every epoch)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="WRN: dropout rate between the two convolutions of every block (the authors' 0.3; default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for file datasets (CUB)")
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate (test accuracy / NCM) every k epochs and after the last (default 1)")
    p.add_argument("--profile", default="manual", help="profile name recorded in summary.json")
    p.add_argument("--out", required=True, type=Path, help="run directory (model.pt, metrics.csv, summary.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refilled", description=__doc__)
    parser.add_argument("--version", action="version", version=f"refilled {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="obtain or verify a dataset", description="Obtain or verify a dataset.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_sub.add_parser("fetch", help="obtain Fashion-MNIST (Debian package or download) or CIFAR-100 (download)",
                                description="Fashion-MNIST: copy the official IDX files under ROOT/fashion-mnist from the "
                                            "Debian package dataset-fashion-mnist if installed, else torchvision's download. "
                                            "CIFAR-100: torchvision's download (needs a network), MD5-verified. "
                                            "CUB-200-2011 cannot be fetched automatically; see docs/datasets.md.")
    fetch.add_argument("--dataset", choices=("fashion-mnist", "cifar100"), default="fashion-mnist")
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
                                       "class permutation pi (or the authors' fixed order); see docs/method.md.")
    split.add_argument("--dataset", required=True, choices=("fashion-mnist", "cifar100", "cub200"))
    split.add_argument("--ratio", required=True, type=float, help="overlap |C & C'| / |C|")
    split.add_argument("--seed", required=True, type=int)
    split.add_argument("--classes-per-task", type=int, default=None, help="h (default: half the classes)")
    split.add_argument("--class-order", choices=("seeded", "authors"), default="seeded",
                       help="class order pi: a permutation drawn from the seed (default), or the authors' fixed "
                            "order (cifar100: CIFAR-FS train, val, test; cub200: class ids)")
    split.add_argument("--out", required=True, type=Path)
    split.set_defaults(func=cmd_split)

    from refilled.methods import CATALOG

    train = sub.add_parser("train", help="train any method of the catalog (refilled.methods.catalog)",
                           description="Train METHOD on the student classes of a split (or, with --task teacher, "
                                       "on its teacher classes). Hyper-parameters are the method's declaration "
                                       "(`refilled methods` lists them); change one with --set KEY=VALUE.")
    _add_train_args(train)
    train.add_argument("--method", required=True, choices=list(CATALOG), help="a method of the catalog")
    train.add_argument("--teacher", type=Path, help="model.pt of the teacher run (methods that need one)")
    train.add_argument("--init", type=Path, help="model.pt of the run this method starts from (e.g. stage 1)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                       help="a hyper-parameter of the method (repeatable), checked against its declaration")
    train.add_argument("--task", choices=("student", "teacher"), default="student",
                       help="the split's classes to learn (teacher: how a teacher is trained, with method student)")
    _add_joint_args(train)
    train.set_defaults(func=cmd_train)

    # Thin aliases of `train`, kept for the commands of earlier versions; which methods each
    # runs is the catalog's `alias` field, and their method flags come from the declarations.
    from refilled.methods.catalog import TEACHER_METHOD

    teacher = sub.add_parser("train-teacher", help=f"alias: train --method {TEACHER_METHOD} --task teacher",
                             description="Train a teacher with cross-entropy on the split's teacher classes.")
    _add_train_args(teacher)
    teacher.set_defaults(func=cmd_train, method=TEACHER_METHOD, task="teacher", teacher=None, init=None, sets=[])
    aliases = {}
    for entry in CATALOG.values():
        if entry.alias:
            aliases.setdefault(entry.alias, []).append(entry)
    for alias, entries in aliases.items():
        names = [e.name for e in entries]
        p = sub.add_parser(alias, help=f"alias: train --method {'|'.join(names)}",
                           description=f"`refilled train` for {', '.join(f'{e.name} ({e.label})' for e in entries)}.")
        _add_train_args(p)
        needs_teacher = all(e.teacher for e in entries)
        p.add_argument("--teacher", type=Path, required=needs_teacher,
                       help="model.pt of the teacher run" + ("" if needs_teacher else " (methods that need one)"))
        if any(e.starts_from for e in entries):
            p.add_argument("--init", type=Path, required=True,
                           help=f"model.pt of the {entries[0].starts_from} run it starts from")
        else:
            p.set_defaults(init=None)
        if len(entries) > 1:
            # the selector of each earlier command: --variant for stage 2, --method otherwise
            flag = "--variant" if all(e.starts_from for e in entries) else "--method"
            p.add_argument(flag, required=True, choices=names, dest="method",
                           help=", ".join(f"{e.name}: {e.label}" for e in entries))
        else:
            p.set_defaults(method=names[0])
        _add_hparam_flags(p, names)
        p.set_defaults(func=cmd_train, task="student", sets=[])

    ref = sub.add_parser("joint-reference", help="Table H's training-free reference: teacher head ⊕ student head",
                         description="Score the training-free joint model of a plain student run on the balanced test "
                                     "set of C' ∪ C (seeded by --seed): the teacher's head over C' and the student's "
                                     "head over C, each softmaxed, concatenated (shared classes from the student). "
                                     "Writes OUT/summary.json with acc_old, acc_new and H.")
    ref.add_argument("--split", required=True, type=Path)
    ref.add_argument("--teacher", required=True, type=Path, help="model.pt of the teacher run")
    ref.add_argument("--student", required=True, type=Path, help="model.pt of the plain student run")
    ref.add_argument("--seed", type=int, default=0, help="seed of the balanced test set (the student run's seed)")
    ref.add_argument("--joint-test-per-class", type=_optional_int, default=None, metavar="N",
                     help="test images per class of C' \\ C and of C (default: as many as the rarest class has)")
    _add_data_args(ref)
    ref.add_argument("--device", default="auto")
    ref.add_argument("--profile", default="manual", help="profile name recorded in summary.json")
    ref.add_argument("--out", required=True, type=Path, help="directory of the reference's summary.json")
    ref.set_defaults(func=cmd_joint_reference)

    methods = sub.add_parser("methods", help="list the catalog: methods, their hyper-parameters and defaults",
                             description="The catalog (src/refilled/methods/catalog.py) as a Markdown table; "
                                         "docs/cli.md's methods table is this output.")
    methods.add_argument("--readme", type=Path, help="rewrite the methods-table block of this Markdown file (docs/cli.md) instead")
    methods.set_defaults(func=cmd_methods)

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

    # ---- workflow commands (Snakemake rules call these; see workflow/rules/) ----
    prep = sub.add_parser("prepare-data", help="verify a dataset and lay out the data root one workflow profile reads",
                          description="Verify DATASET under --root (checksums where known), then write OUT/<dataset dir>: "
                                      "a link to the verified files, or, with --test-per-class / --train-per-class "
                                      "(Fashion-MNIST only), IDX files holding a seeded per-class subsample. Writes "
                                      "OUT/<dataset>.json last, describing what was prepared.")
    prep.add_argument("--dataset", required=True, choices=("fashion-mnist", "cifar100", "cub200"))
    prep.add_argument("--root", required=True, help="directory holding the raw datasets (data/raw)")
    prep.add_argument("--out", required=True, type=Path, help="prepared data root (data/prepared/PROFILE)")
    prep.add_argument("--test-per-class", type=_optional_int, default=None, help="keep this many test images per class (or 'all')")
    prep.add_argument("--train-per-class", type=_optional_int, default=None, help="keep this many training images per class (or 'all')")
    prep.add_argument("--seed", type=int, default=0, help="seed of the subsample")
    prep.add_argument("--no-checksum", action="store_true")
    prep.set_defaults(func=cmd_prepare_data)

    pin = sub.add_parser("pin", help="run one refilled command pinned to a GPU slot and a set of CPU cores",
                         description="Run `refilled COMMAND ...` in this process after choosing a free slot through lock "
                                     "files: on a machine with N GPUs one of N x --per-gpu GPU slots "
                                     "(CUDA_VISIBLE_DEVICES = that GPU, so --device auto means it), and one of "
                                     "cores // --threads CPU slots (the process's CPU affinity, so torch uses exactly "
                                     "--threads cores). Waits while every slot is taken. Without GPUs only the CPU "
                                     "pinning applies. Slots are released when the process exits.")
    pin.add_argument("--gpus", default="auto", help="number of GPUs to share, or auto (CUDA_VISIBLE_DEVICES, else nvidia-smi -L)")
    pin.add_argument("--per-gpu", type=int, default=1, help="jobs at once per GPU (default 1)")
    pin.add_argument("--threads", type=int, default=0, help="CPU cores for this job (0: no CPU pinning)")
    pin.add_argument("--lock-dir", type=Path, default=None, help="where the slot lock files live (default: a per-user temp dir)")
    pin.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the refilled command to run")
    pin.set_defaults(func=_cmd_pin)

    table = sub.add_parser("table", help="a paper table (1-4) from run summaries: wide CSV, long CSV, Markdown",
                           description="Tables 1 and 2: one block per overlap ratio, methods as rows, student "
                                       "architectures as columns, cells 'mean ± std' of the final-epoch test accuracy "
                                       "(%) over seeds. Table 3 (standard KD, one ratio): the same, the teacher's "
                                       "accuracy in the caption (--teachers). Table 4: overlap ratios as rows, K-hat as columns, NCM accuracy "
                                       "after stage 1. Every number is read from the summary.json files given; a "
                                       "missing or duplicated cell is an error.")
    table.add_argument("--table", required=True, choices=("1", "2", "3", "4", "h"),
                       help="h: Table H, Acc_C' / Acc_C / H of the joint-head runs and the reference (its grid "
                            "is per experiment: --grid instead of --ratios and --columns)")
    table.add_argument("--summaries", required=True, nargs="+", type=Path, help="summary.json of every run in the table")
    table.add_argument("--ratios", nargs="+", type=float, help="row blocks, in order (Tables 1, 2, 4)")
    table.add_argument("--columns", nargs="+",
                       help="Tables 1/2: student architectures; Table 4: K-hat values (1, 5, inf), in order")
    table.add_argument("--methods", nargs="+", default=None, help="Tables 1/2: methods (rows), in order (default: all six)")
    table.add_argument("--lam", type=float, default=None, help="Tables 1/2: the lambda of the REFILLED rows (check)")
    table.add_argument("--grid", nargs=3, action="append", default=None, metavar=("EXP", "RATIOS", "ARCHS"),
                       help="Table H, once per experiment: its name (the run paths' students/EXP/), its ratios and "
                            "its students, comma-separated")
    table.add_argument("--teachers", nargs="+", type=Path, default=None,
                       help="Table 3: summary.json of the teacher run of every seed (its accuracy goes in the caption)")
    table.add_argument("--out", required=True, type=Path, help="wide CSV (the supplement's shape)")
    table.add_argument("--long", required=True, type=Path, help="long CSV: one row per run")
    table.add_argument("--markdown", required=True, type=Path)
    table.set_defaults(func=cmd_table)

    auc = sub.add_parser("lambda-auc", help="AUC of lambda_i separating seen from unseen classes, per stage-2 run",
                         description="For each stage-2 run directory (lambda_i.csv + summary.json): the ROC AUC of "
                                     "lambda_i as a score for 'the class is one the teacher was trained on', and the "
                                     "mean lambda_i of seen and unseen instances. Empty AUC where one group is empty.")
    auc.add_argument("--runs", required=True, nargs="+", type=Path, help="stage-2 run directories")
    auc.add_argument("--out", required=True, type=Path, help="CSV, one row per run")
    auc.set_defaults(func=cmd_lambda_auc)

    fig = sub.add_parser("figure", help="a paper figure (1, 2 or 3) as PNG and PDF",
                         description="1: convergence (stage-1 loss and NCM accuracy, stage-2 CE, KL and test accuracy "
                                     "per epoch); 2: REFILLED accuracy against lambda per student; 3: histograms of "
                                     "lambda_i, seen vs unseen classes, with the AUC.")
    fig.add_argument("--figure", required=True, choices=("1", "2", "3"))
    fig.add_argument("--runs", required=True, nargs="+", type=Path,
                     help="1: the stage-1 run then the stage-2 run (repeat the pair per seed); 2 and 3: run directories")
    fig.add_argument("--out", required=True, type=Path, help="output path without suffix; writes OUT.png and OUT.pdf")
    fig.set_defaults(func=cmd_figure)

    claims = sub.add_parser("claims", help="test the supplement's claims over seeds: verdicts in CSV and Markdown",
                            description="Paired per-seed differences, 95% Student-t intervals and a verdict (holds / "
                                        "fails / inconclusive) per comparison, by the rules of refilled.report.claims (and "
                                        "docs/claims.md). Inputs are the workflow's tables and run summaries.")
    claims.add_argument("--table", nargs=2, action="append", default=[], metavar=("N", "LONG_CSV"),
                        help="claims (a), (b): table N (1 or 2) and its long CSV; repeatable")
    claims.add_argument("--table4", type=Path, help="claim (d): results/table4_long.csv")
    claims.add_argument("--lambda-auc", type=Path, help="claim (c): results/lambda_auc.csv")
    claims.add_argument("--auc-ratio", default="0.6", help="claim (c): the overlap ratio tested (default 0.6)")
    claims.add_argument("--lambda-sweep", nargs="+", type=Path, default=[],
                        help="claim (e): summary.json of every run of Figure 2's lambda sweep")
    claims.add_argument("--note", default="", help="a line under the title (profile, machine)")
    claims.add_argument("--out", required=True, type=Path, help="CSV, one row per comparison")
    claims.add_argument("--markdown", required=True, type=Path)
    claims.set_defaults(func=cmd_claims)

    rep = sub.add_parser("reproduction", help="our tables beside the supplement's: values, or the methods' orderings",
                         description="Same dataset and students as the paper: each cell beside the supplement's value "
                                     "and whether that value lies inside our 95% t-interval. Another dataset: Kendall's "
                                     "tau between our ordering of the methods and the supplement's, per cell block.")
    rep.add_argument("--table", nargs=4, action="append", required=True,
                     metavar=("N", "LONG_CSV", "DATASET", "STUDENTS"),
                     help="table N (1-4), its long CSV, our dataset, our students comma-separated, each as "
                          "OURS=PAPERS (e.g. wrn-10-1=wrn-16-1: the supplement's student it stands for) or, in the "
                          "paper's order, OURS; repeatable")
    rep.add_argument("--out", required=True, type=Path, help="CSV")
    rep.add_argument("--markdown", required=True, type=Path)
    rep.set_defaults(func=cmd_reproduction)

    gain = sub.add_parser("gain-vs-data", help="gain of each method over the reference against the student's data",
                          description="Per (images per class, overlap ratio): each method's accuracy minus the "
                                      "reference's, paired per seed, the reference's accuracy and the teacher "
                                      "embedding's NCM accuracy on the student's classes, with 95% t-intervals.")
    gain.add_argument("--summaries", required=True, nargs="+", type=Path, help="summary.json of every sweep run")
    gain.add_argument("--teacher-ncm", nargs="*", type=Path, default=[],
                      help="JSON of `refilled ncm --task student` with the teacher's model, one per point and seed")
    gain.add_argument("--reference", default="student", help="the method the others are compared with")
    gain.add_argument("--out", required=True, type=Path, help="CSV")
    gain.add_argument("--figure", required=True, type=Path, help="output path without suffix (.png and .pdf)")
    gain.set_defaults(func=cmd_gain)
    from refilled.tools.doctor import add_doctor_parser
    from refilled.tools.plan import add_plan_parser
    from refilled.report.results import add_results_parsers

    # refilled.tools.bench imports torch: its own parser (`refilled bench --help`) is built only when it runs
    sub.add_parser("bench", add_help=False, help="images/s of our training step against a reference-style pipeline "
                                                 "(refilled bench --help)")   # main() hands it to refilled.tools.bench
    add_doctor_parser(sub)
    add_plan_parser(sub)
    add_results_parsers(sub)
    return parser


def _optional_int(value: str) -> int | None:
    if value in ("all", "none", "None", "null"):
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value}")
    return n


def cmd_data_fetch(args) -> int:
    from refilled.data import dataset_dir, load_dataset, obtain_fashion_mnist

    if args.dataset == "fashion-mnist":
        path = obtain_fashion_mnist(args.root)
    else:
        load_dataset(args.dataset, args.root, verify_checksums=True, download=True)
        path = dataset_dir(args.dataset, args.root)
    print(f"{args.dataset} ready in {path}")
    return 0


def cmd_data_check(args) -> int:
    from refilled.data.check import check_dataset, format_summary

    print(format_summary(check_dataset(args.dataset, args.root, verify_checksums=not args.no_checksum,
                                       decode_limit=args.decode_limit)))
    return 0


def cmd_split(args) -> int:
    from refilled.data.splits import make_split
    from refilled.io import write_json

    split = make_split(args.dataset, args.ratio, args.seed, args.classes_per_task, args.class_order)
    write_json(args.out, split)
    print(f"{args.out}: teacher {split['teacher_classes']} student {split['student_classes']}")
    return 0


def _add_joint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--joint-head", type=float, default=None, metavar="WEIGHT",
                   help="add the joint head over C' \\ C (Table H; needs --teacher) with this weight on its "
                        "LwF term (default: no joint head)")
    p.add_argument("--joint-T", type=float, default=2.0, metavar="T", help="temperature of the LwF term (default 2)")
    p.add_argument("--joint-test-per-class", type=_optional_int, default=None, metavar="N",
                   help="balanced test set: images per class of C' \\ C and of C (default: as many as the rarest "
                        "class has)")


def _joint_spec(args):
    from refilled.training.run import JointSpec

    if getattr(args, "joint_head", None) is None:
        return None
    return JointSpec(weight=args.joint_head, T=args.joint_T, test_per_class=args.joint_test_per_class)


def _add_hparam_flags(p: argparse.ArgumentParser, methods: list[str]) -> None:
    """--<key> flags for the settable hyper-parameters of `methods` (an alias's flags)."""
    from refilled.methods import CATALOG

    flags = {}
    for name in methods:
        for key, hp in CATALOG[name].settable.items():
            flags.setdefault(key, hp)
    for key, hp in flags.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=f"hp_{key}", default=None, metavar="VALUE",
                       help=f"{hp.meaning} ({hp.allowed()}; default {hp.format(hp.parse(hp.default, key))})")


def _overrides(args) -> dict:
    """--set KEY=VALUE and an alias's --<key> flags, as {key: text}."""
    out = {}
    for item in args.sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    out.update({k[3:]: v for k, v in vars(args).items() if k.startswith("hp_") and v is not None})
    return out


def cmd_train(args) -> int:
    from refilled.methods import get
    from refilled.training.run import RunSpec, train

    entry = get(args.method)
    overrides = _overrides(args)
    entry.resolve(overrides)   # a bad key or value stops here, before any data is read or file written
    spec = RunSpec(split=args.split, arch=args.arch, out=args.out, epochs=args.epochs, seed=args.seed,
                   data_root=Path(args.data_root), per_class=args.per_class, verify_checksums=not args.no_checksum,
                   batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                   schedule=args.schedule or entry.schedule, device=args.device, num_workers=args.num_workers,
                   eval_every=args.eval_every, profile=args.profile, dropout=args.dropout,
                   milestones=tuple(args.milestones) if args.milestones else None, gamma=args.gamma,
                   val_per_class=args.val_per_class, joint=_joint_spec(args))
    summary = train(spec, args.method, args.teacher, args.init, overrides, task=args.task)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.endswith("_acc"))
    print(f"{summary['method']} ({summary['task']} task) {summary['arch']} seed {summary['seed']}: {scores}"
          + (f"; {_joint_text(summary['joint'])}" if "joint" in summary else ""))
    return 0


def _joint_text(j: dict) -> str:
    old = "—" if j["acc_old"] is None else f"{j['acc_old']:.4f}"
    return f"joint Acc_C' {old}, Acc_C {j['acc_new']:.4f}, H {j['H']:.4f}"


def cmd_joint_reference(args) -> int:
    from refilled.training.run import JointSpec, RunSpec, joint_reference

    spec = RunSpec(split=args.split, arch="", out=args.out, epochs=1, seed=args.seed, data_root=Path(args.data_root),
                   verify_checksums=not args.no_checksum, device=args.device, profile=args.profile,
                   per_class=args.per_class, joint=JointSpec(test_per_class=args.joint_test_per_class))
    summary = joint_reference(spec, args.teacher, args.student)
    print(f"reference {summary['arch']} seed {summary['seed']}: {_joint_text(summary['joint'])}")
    return 0


def cmd_methods(args) -> int:
    import re

    from refilled.io import atomic_write_text
    from refilled.methods.catalog import protocol_table

    if not args.readme:
        print(protocol_table(), end="")
        return 0
    text = args.readme.read_text(encoding="utf-8")
    block = re.compile(r"(<!-- methods-table[^\n]*-->\n)(.*?)(<!-- /methods-table -->)", re.S)
    if not block.search(text):
        raise ValueError(f"{args.readme}: no '<!-- methods-table -->' ... '<!-- /methods-table -->' block")
    atomic_write_text(args.readme, block.sub(lambda m: m.group(1) + protocol_table() + m.group(3), text))
    print(f"{args.readme}: methods table updated")
    return 0


def cmd_ncm(args) -> int:
    from refilled.io import write_json
    from refilled.training.ncm import ncm_score

    result = ncm_score(args.split, args.data_root, args.task, args.per_class, args.seed, args.device,
                       model_path=args.model, random_init=args.random_init, verify_checksums=not args.no_checksum)
    if args.out:
        write_json(args.out, result)
    print(f"NCM accuracy on the {args.task} classes {result['classes']}: {result['ncm_acc']:.4f}")
    return 0


def cmd_prepare_data(args) -> int:
    from refilled.data.prepare import prepare_data

    info = prepare_data(args.dataset, Path(args.root), Path(args.out), args.test_per_class, args.train_per_class,
                        args.seed, verify_checksums=not args.no_checksum)
    print(f"{args.dataset} ({info['kind']}) in {info['path']}: {info['n_train']} training, {info['n_test']} test images")
    return 0


def _cmd_pin(args) -> int:
    from refilled.tools.pin import cmd_pin

    return cmd_pin(args, main)


def cmd_table(args) -> int:
    from refilled.report.tables import write_table, write_table_h

    if args.table == "h":
        if not args.grid or args.ratios or args.columns:
            raise ValueError("table h: give --grid EXP RATIOS ARCHS per experiment (not --ratios / --columns)")
        grid = [(exp, [float(r) for r in ratios.split(",")], archs.split(",")) for exp, ratios, archs in args.grid]
        path = write_table_h(args.summaries, grid, args.methods, args.out, args.long, args.markdown)
        print(f"table h: {path}")
        return 0
    if args.grid or not args.ratios or not args.columns:
        raise ValueError(f"table {args.table}: give --ratios and --columns (--grid is Table H's)")
    path = write_table(args.table, args.summaries, args.ratios, args.columns, args.methods, args.lam,
                       args.out, args.long, args.markdown, teachers=args.teachers)
    print(f"table {args.table}: {path}")
    return 0


def cmd_lambda_auc(args) -> int:
    from refilled.report.tables import write_lambda_auc

    rows = write_lambda_auc(args.runs, args.out)
    for r in rows:
        print(f"{r['run']}: AUC {r['auc']}")
    return 0


def cmd_figure(args) -> int:
    from refilled.report.figures import FIGURES

    paths = FIGURES[args.figure](args.runs, args.out)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_claims(args) -> int:
    from refilled.report.claims import ClaimsError, combine, evaluate_claims, write_claims

    tables = {}
    for number, path in args.table:
        if number not in ("1", "2"):
            raise ClaimsError(f"--table {number}: claims (a) and (b) read Table 1 or 2")
        tables[number] = Path(path)
    rows = evaluate_claims(tables, args.table4, args.lambda_auc, args.lambda_sweep, args.auc_ratio)
    write_claims(rows, args.out, args.markdown, args.note)
    for claim in sorted({r["claim"] for r in rows}):
        print(f"claim ({claim}): {combine([r['verdict'] for r in rows if r['claim'] == claim])}")
    return 0


def cmd_reproduction(args) -> int:
    from refilled.report.reproduction import write_reproduction

    tables = [(n, Path(path), dataset, students.split(",")) for n, path, dataset, students in args.table]
    values, orders = write_reproduction(tables, args.out, args.markdown)
    print(f"reproduction: {len(values)} cells beside the paper's values, {len(orders)} orderings compared")
    return 0


def cmd_gain(args) -> int:
    from refilled.report.gain import write_gain

    rows = write_gain(args.summaries, args.teacher_ncm, args.reference, args.out, args.figure)
    print(f"gain vs data: {len(rows)} rows in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `refilled` command. Called without `argv` (the command line), it runs in the fork
    server's warm process where a local Snakemake run offers one (`refilled.tools.forkserver`)."""
    if argv is None:
        from refilled.tools.forkserver import run_via_server

        code = run_via_server(sys.argv[1:])
        if code is not None:
            return code
    from refilled.data.splits import SplitError
    from refilled.io import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from refilled.tools.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        from refilled.data import DataError
    except ImportError:  # pragma: no cover - the data package always defines it
        DataError = RuntimeError
    try:
        return args.func(args)
    except (DataError, SplitError, CheckpointError, ValueError, FloatingPointError, OSError) as exc:
        print(f"refilled {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
