"""`refilled doctor`: what to run when something looks wrong.

One look at everything a failed or suspicious run depends on, without changing anything:

- versions of Python, refilled, torch, torchvision, snakemake and dvc;
- the device: CUDA available or not, the GPUs' names, CPU threads;
- each dataset under the data root: present, absent, or partly there (which files are
  missing); with ``--verify`` the full `refilled data check` (checksums, structure, labels);
- the DVC default remote from ``.dvc/config`` (and ``.dvc/config.local``): a local
  directory is checked (exists, writable); any other kind of remote is "not checked";
- the decoded-image cache (CUB on CUDA): where it is, how many splits and bytes it holds,
  and temporary files a killed decode left there;
- incomplete runs: run directories under ``--runs`` that hold ``resume.pt`` or
  ``metrics.csv`` but no ``summary.json`` (the completion marker), with their last finished
  epoch; temporary files left by a killed write; a Snakemake lock or incomplete-output
  markers left by a killed ``snakemake``.

Every line starts with its status: ``ok``, ``info``, ``warn`` or ``FAIL``. The exit status
is 1 when at least one line is FAIL (something is broken: a dataset only partly present
or failing verification, an unreachable local DVC remote, an unreadable checkpoint of an
incomplete run, torch not importable), else 0. Warnings (incomplete runs, leftovers of a
killed process, a missing remote directory) do not change it. Nothing is written.
"""

from __future__ import annotations

import argparse
import base64
import csv
import importlib.metadata
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

OK, INFO, WARN, FAIL = "ok", "info", "warn", "FAIL"

PACKAGES = ("refilled", "torch", "torchvision", "snakemake", "dvc")

EPILOG = """\
exit status:
  0  nothing is broken (warnings, e.g. incomplete runs or a stale Snakemake lock, may be listed)
  1  at least one FAIL line: a dataset only partly present or failing --verify, the DVC
     default remote is a local path that is not a writable directory, a checkpoint of an
     incomplete run does not load, or torch cannot be imported
  2  usage error

Nothing is written or deleted. See docs/troubleshooting.md.
"""


@dataclass
class Finding:
    status: str          # ok | info | warn | FAIL
    topic: str           # versions, device, data, dvc, runs, snakemake
    message: str
    details: list[str] = field(default_factory=list)


@dataclass
class RunState:
    path: Path
    last_epoch: int | None       # last finished epoch, None when unknown
    epochs: int | None           # planned epochs (from resume.pt), None when unknown
    source: str                  # where last_epoch comes from: resume.pt, metrics.csv, none
    error: str | None = None     # resume.pt present but unreadable


# ------------------------------------------------------------------------------------------
# versions and device
# ------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_versions() -> list[Finding]:
    versions = package_versions()
    missing = [k for k, v in versions.items() if v == "not installed" and k in ("torch", "refilled")]
    text = ", ".join(f"{k} {v}" for k, v in versions.items())
    if missing:
        return [Finding(FAIL, "versions", text + f" (needed: {', '.join(missing)}; run `make setup`)")]
    return [Finding(OK, "versions", text)]


def check_device() -> list[Finding]:
    try:
        import torch
    except Exception as exc:   # a broken install: report it, do not crash
        return [Finding(FAIL, "device", f"torch cannot be imported ({type(exc).__name__}: {exc})")]
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"{threads} CPU core(s) available to this process, torch {torch.get_num_threads()} thread(s)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    try:
        cuda = torch.cuda.is_available()
    except Exception as exc:
        return [Finding(WARN, "device", f"CUDA check failed ({type(exc).__name__}: {exc}); {cpu}{env}")]
    if not cuda:
        build = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "torch built without CUDA"
        return [Finding(INFO, "device", f"CPU only: CUDA not available ({build}); {cpu}{env}")]
    names = []
    for i in range(torch.cuda.device_count()):
        try:
            props = torch.cuda.get_device_properties(i)
            names.append(f"cuda:{i} {props.name} ({props.total_memory / 2**30:.0f} GiB, "
                         f"capability {props.major}.{props.minor})")
        except Exception as exc:
            names.append(f"cuda:{i} unreadable ({type(exc).__name__}: {exc})")
    return [Finding(OK, "device", f"CUDA {torch.version.cuda}, {len(names)} GPU(s); {cpu}{env}", names)]


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def _expected_files(name: str, directory: Path) -> list[tuple[str, list[Path]]]:
    """(label, candidates) per file a dataset needs; present when any candidate exists."""
    if name == "fashion-mnist":
        from refilled.data.fashion_mnist import FASHION_MNIST_FILES

        return [(b, [directory / b, directory / f"{b}.gz"]) for b in FASHION_MNIST_FILES]
    if name == "cifar100":
        return [(f, [directory / f]) for f in ("train", "test", "meta")]
    return [(f, [directory / f]) for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt",
                                           "classes.txt", "images")]


def _profiles_using(repo: Path) -> dict[str, list[str]]:
    """dataset -> the workflow profiles (config/*.yaml) whose experiments use it."""
    used: dict[str, list[str]] = {}
    config = repo / "config"
    if not config.is_dir():
        return used
    try:
        import yaml
    except ImportError:
        return used
    for path in sorted(config.glob("*.yaml")):
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
            datasets = {e["dataset"] for e in cfg["experiments"].values()}
        except Exception:
            continue
        for d in sorted(datasets):
            used.setdefault(d, []).append(path.stem)
    return used


def check_data(root: Path, repo: Path, verify: bool = False, decode_limit: int | None = 8) -> list[Finding]:
    from refilled.data.datasets import DATASETS, HOW_TO_OBTAIN, DataError, dataset_dir

    used = _profiles_using(repo)
    findings = []
    for name in DATASETS:
        directory = dataset_dir(name, root)
        needed = f" (used by profile(s) {', '.join(used[name])})" if used.get(name) else ""
        if not directory.exists():
            how = HOW_TO_OBTAIN[name].format(root=root, dir=directory)
            findings.append(Finding(INFO, "data", f"{name}: absent, no {directory}{needed}", [f"to obtain: {how}"]))
            continue
        missing = [label for label, candidates in _expected_files(name, directory)
                   if not any(c.exists() for c in candidates)]
        if missing:
            findings.append(Finding(FAIL, "data", f"{name}: only partly present in {directory}; missing "
                                                  f"{', '.join(missing)}{needed}",
                                    [f"run `refilled data check --dataset {name} --root {root}` for details"]))
            continue
        if not verify:
            findings.append(Finding(OK, "data", f"{name}: files present in {directory}{needed} "
                                                "(not verified; --verify checks checksums and structure)"))
            continue
        from refilled.data.check import check_dataset

        try:
            s = check_dataset(name, root, verify_checksums=True, decode_limit=decode_limit)
        except (DataError, ValueError, OSError) as exc:
            findings.append(Finding(FAIL, "data", f"{name}: verification failed", str(exc).splitlines()))
            continue
        findings.append(Finding(OK, "data", f"{name}: verified in {directory}: {s['n_train']} training / "
                                            f"{s['n_test']} test images, {s['n_classes']} classes, "
                                            f"checksums {s['checksum']}{needed}"))
    return findings


# ------------------------------------------------------------------------------------------
# DVC remote
# ------------------------------------------------------------------------------------------


def _read_dvc_config(path: Path) -> dict[str, dict[str, str]]:
    """DVC's INI-like config: sections such as [core] and ['remote "name"']; keys `k = v`."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    if not path.is_file():
        return sections
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        m = re.fullmatch(r"\[\s*'?(.*?)'?\s*\]", line)
        if m:
            current = re.sub(r"\s+", " ", m.group(1).strip())
            sections.setdefault(current, {})
            continue
        if current is not None and "=" in line:
            key, value = line.split("=", 1)
            sections[current][key.strip()] = value.strip()
    return sections


def dvc_default_remote(repo: Path) -> tuple[str | None, str | None, Path]:
    """(remote name, url, directory of the config that defines the url); config.local wins."""
    dvc_dir = repo / ".dvc"
    merged: dict[str, dict[str, str]] = {}
    origin: dict[str, Path] = {}
    for fname in ("config", "config.local"):
        for section, values in _read_dvc_config(dvc_dir / fname).items():
            merged.setdefault(section, {}).update(values)
            if "url" in values:
                origin[section] = dvc_dir
    name = merged.get("core", {}).get("remote")
    if not name:
        return None, None, dvc_dir
    section = f'remote "{name}"'
    return name, merged.get(section, {}).get("url"), origin.get(section, dvc_dir)


def check_dvc(repo: Path) -> list[Finding]:
    if not (repo / ".dvc").is_dir():
        return [Finding(INFO, "dvc", f"{repo} is not a DVC repository (no .dvc/); remote not checked")]
    name, url, base = dvc_default_remote(repo)
    if name is None:
        return [Finding(WARN, "dvc", "no default remote in .dvc/config (`dvc remote add -d NAME URL`)")]
    if url is None:
        return [Finding(FAIL, "dvc", f"default remote {name!r} has no url in .dvc/config")]
    scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    if scheme and scheme.group(1).lower() != "file":
        return [Finding(INFO, "dvc", f"default remote {name!r} = {url}: not checked ({scheme.group(1)} remote; "
                                     f"`dvc status -c` contacts it)")]
    local = url[len("file://"):] if scheme else url
    path = Path(local).expanduser()
    path = path if path.is_absolute() else (base / path)
    where = f"default remote {name!r} = {url} -> {os.path.normpath(path)}"
    if path.is_dir():
        if os.access(path, os.W_OK | os.X_OK):
            return [Finding(OK, "dvc", f"{where}: reachable (a writable directory)")]
        return [Finding(FAIL, "dvc", f"{where}: a directory, but not writable (dvc push would fail)")]
    if path.exists():
        return [Finding(FAIL, "dvc", f"{where}: exists but is not a directory")]
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [Finding(FAIL, "dvc", f"{where}: does not exist and cannot be created ({parent} is not a writable "
                                     f"directory)")]
    return [Finding(WARN, "dvc", f"{where}: does not exist yet (`dvc pull` has nothing to pull; `dvc push` "
                                 f"creates it)")]


# ------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------


def _last_metrics_epoch(path: Path) -> int | None:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return int(rows[-1]["epoch"]) if rows else 0
    except (OSError, KeyError, ValueError, csv.Error):
        return None


def run_state(run_dir: Path) -> RunState:
    """Where an unfinished run directory stands: resume.pt first (what a rerun resumes from)."""
    resume, metrics = run_dir / "resume.pt", run_dir / "metrics.csv"
    if resume.exists():
        from refilled.io import CheckpointError, load_tensors

        try:
            state = load_tensors(resume)
            epochs = state.get("fingerprint", {}).get("optim", {}).get("epochs")
            return RunState(run_dir, int(state["epoch"]), epochs, "resume.pt")
        except (CheckpointError, KeyError, TypeError, ValueError, AttributeError) as exc:
            return RunState(run_dir, _last_metrics_epoch(metrics) if metrics.exists() else None, None,
                            "metrics.csv" if metrics.exists() else "none", str(exc).splitlines()[0])
    if metrics.exists():
        return RunState(run_dir, _last_metrics_epoch(metrics), None, "metrics.csv")
    return RunState(run_dir, None, None, "none")


def scan_runs(runs_root: Path) -> tuple[list[Path], list[RunState], list[Path]]:
    """(finished run dirs, incomplete run states, temporary files left by killed writes)."""
    finished, incomplete, temps = [], [], []
    for dirpath, dirnames, filenames in os.walk(runs_root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".snakemake", ".git", ".dvc", ".finished"))  # .finished: refilled.training.finished
        names = set(filenames)
        here = Path(dirpath)
        temps += [here / f for f in sorted(names) if f.startswith(".") and f.endswith(".tmp")]
        if "summary.json" in names:
            finished.append(here)
        elif names & {"resume.pt", "metrics.csv"}:
            incomplete.append(run_state(here))
    return finished, incomplete, temps


def check_runs(runs_root: Path) -> list[Finding]:
    if not runs_root.is_dir():
        return [Finding(INFO, "runs", f"no {runs_root}: no runs yet")]
    finished, incomplete, temps = scan_runs(runs_root)
    findings = [Finding(OK if not incomplete else WARN, "runs",
                        f"{len(finished)} finished, {len(incomplete)} incomplete run(s) under {runs_root}")]
    for st in incomplete:
        if st.error:
            findings.append(Finding(FAIL, "runs", f"incomplete: {st.path}: resume.pt does not load ({st.error}); "
                                                  f"move it away to restart this run from epoch 0"))
            continue
        if st.last_epoch is None:
            done = "no finished epoch recorded"
        else:
            of = f" of {st.epochs}" if st.epochs else ""
            done = f"last finished epoch {st.last_epoch}{of} ({st.source})"
        findings.append(Finding(WARN, "runs", f"incomplete: {st.path}: {done}; rerunning the same command or "
                                              "Snakemake target resumes it"))
    if temps:
        findings.append(Finding(WARN, "runs", f"{len(temps)} temporary file(s) left by a killed write (never taken "
                                              "as outputs; safe to delete once nothing runs)",
                                [str(t) for t in temps[:20]] + (["..."] if len(temps) > 20 else [])))
    return findings


def check_snakemake(repo: Path) -> list[Finding]:
    meta = repo / ".snakemake"
    if not meta.is_dir():
        return []
    findings = []
    locks = sorted((meta / "locks").glob("*.lock")) if (meta / "locks").is_dir() else []
    if locks:
        findings.append(Finding(WARN, "snakemake", f"{len(locks)} lock file(s) in {meta / 'locks'}: a snakemake is "
                                                   "running here, or one was killed; if none runs: "
                                                   "`snakemake --unlock` (same target and --config)"))
    incomplete = meta / "incomplete"
    markers = sorted(p for p in incomplete.rglob("*") if p.is_file()) if incomplete.is_dir() else []
    outputs = []
    for marker in markers:
        # Snakemake names a marker by the urlsafe base64 of the output path, split into
        # directories ("@" + chunk) when longer than a file name may be
        encoded = "".join(part[1:] if part.startswith("@") else part for part in marker.relative_to(incomplete).parts)
        try:
            outputs.append(base64.urlsafe_b64decode(encoded.encode()).decode())
        except (ValueError, UnicodeDecodeError):
            outputs.append(str(marker))
    if outputs:
        findings.append(Finding(WARN, "snakemake", f"{len(outputs)} output(s) marked incomplete by a killed or "
                                                   "running job: rerun with --rerun-incomplete "
                                                   "(workflow/profiles/local sets it)", sorted(outputs)))
    if not findings:
        findings.append(Finding(OK, "snakemake", f"no lock and no incomplete outputs in {meta}"))
    return findings


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------


def check_image_cache(cache_dir: Path | None = None) -> list[Finding]:
    if cache_dir is None:
        from refilled.data.augment import default_cache_dir

        cache_dir = default_cache_dir()
    caches = sorted(cache_dir.glob("images_*.pt")) if cache_dir.is_dir() else []
    temps = sorted(cache_dir.glob(".images_*.tmp")) if cache_dir.is_dir() else []
    size = sum(p.stat().st_size for p in caches + temps)
    held = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    findings = [Finding(INFO, "cache", f"decoded images (CUB on CUDA): {cache_dir}: {len(caches)} split(s), {held}"
                                       + ("" if caches else " (filled by the first CUDA run)"))]
    if temps:
        findings.append(Finding(WARN, "cache", f"{len(temps)} temporary file(s) left by a killed decode (safe to delete "
                                               "once nothing runs)", [str(t) for t in temps]))
    return findings


def diagnose(repo: Path = Path("."), data_root: Path | None = None, runs: Path | None = None,
             verify: bool = False, decode_limit: int | None = 8) -> list[Finding]:
    repo = Path(repo)
    data_root = Path(data_root) if data_root is not None else repo / "data" / "raw"
    runs = Path(runs) if runs is not None else repo / "results"
    return (check_versions() + check_device() + check_data(data_root, repo, verify, decode_limit)
            + check_image_cache() + check_dvc(repo) + check_runs(runs) + check_snakemake(repo))


def format_findings(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{f.status:<4}  {f.topic:<9}  {f.message}")
        lines += [f"{'':<17}{d}" for d in f.details]
    n_fail = sum(f.status == FAIL for f in findings)
    n_warn = sum(f.status == WARN for f in findings)
    lines.append(f"{n_fail} problem(s), {n_warn} warning(s)" if n_fail or n_warn else "nothing looks wrong")
    return "\n".join(lines)


def add_doctor_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "doctor", help="check versions, device, data, DVC remote and unfinished runs (writes nothing)",
        description=__doc__.split("\n\n")[0] + " Versions, device, data per dataset, the DVC default remote, "
                    "incomplete runs (with their last finished epoch), leftovers of killed processes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path("."),
                   help="repository root: .dvc/config, .snakemake/ and config/ are read from here (default: .)")
    p.add_argument("--data-root", type=Path, default=None, help="directory holding the datasets (default: REPO/data/raw)")
    p.add_argument("--runs", type=Path, default=None,
                   help="where to look for run directories (default: REPO/results)")
    p.add_argument("--verify", action="store_true",
                   help="verify every present dataset like `refilled data check` (checksums; slow on full data)")
    p.add_argument("--decode-limit", type=int, default=8,
                   help="with --verify: CUB images decoded per split (default 8)")
    p.set_defaults(func=cmd_doctor)
    return p


def cmd_doctor(args) -> int:
    findings = diagnose(args.repo, args.data_root, args.runs, args.verify, args.decode_limit)
    print(format_findings(findings))
    return 1 if any(f.status == FAIL for f in findings) else 0


def main(argv: list[str] | None = None) -> int:
    """`refilled doctor` on its own (the same parser as the subcommand)."""
    parser = argparse.ArgumentParser(prog="refilled")
    add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
