"""`refilled bench --concurrent N`: N processes training one case at once on the device, and
their aggregate images per second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from refilled.tools.bench_cases import Case, Config, _Data, _sync, build_method, failure_note, full_config, small_config
from refilled.tools.bench_ours import _endless, _our_batches


def _child(spec: dict) -> int:
    """One of N concurrent jobs: warm up, say ready, wait for 'go', train for `seconds`."""
    device = torch.device(spec["device"])
    case = Case(**spec["case"])
    cfg = small_config() if spec["config"] == "small" else full_config()
    cfg.cases = [case]
    ready, go = Path(spec["ready"]), Path(spec["go"])
    from refilled.training.step import TrainStep

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="refilled-bench-child-") as tmp:
        data = _Data(cfg, Path(tmp))
        method = build_method(case, device)
        stream = _endless(_our_batches(case, cfg, data, device))
        step = TrainStep(method, device)
        step.begin_epoch(0, 0.1)
        method.train()
        for _ in range(cfg.warmup + 1):
            step.step(*next(stream))
        _sync(device)
        ready.write_text("ready")
        deadline = time.time() + 600
        while not go.exists():
            if time.time() > deadline:
                return 3
            time.sleep(0.005)
        began = time.perf_counter()
        n = 0
        while True:
            step.step(*next(stream))
            n += 1
            if n % cfg.sync_every == 0:
                _sync(device)
                if time.perf_counter() - began >= spec["seconds"]:
                    break
        elapsed = time.perf_counter() - began
    print(json.dumps({"images": n * case.batch, "seconds": elapsed, "mode": step.record()["mode"]}), flush=True)
    return 0


def concurrent_rows(cfg: Config, device: torch.device, jobs_list: list[int], case: Case, seconds: float,
                    log=print, on_row=None, one_job: tuple[float, str] | None = None) -> list[dict]:
    """Aggregate images per second of N processes each running our step of `case`, one row
    per N (ascending), each passed to `on_row(row)` when measured. `vs_one_job` compares
    with the N = 1 round, or where there is none with `one_job` (img/s, what it is)."""
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    if device.type == "cuda":
        torch.cuda.empty_cache()    # leave the GPU's memory to the children
    for jobs in sorted(jobs_list):
        row = {"method": f"{case.method} (concurrent)", "student": case.student, "teacher": case.teacher or "",
               "px": case.px, "batch": case.batch, "jobs": jobs, "device": dev_name, "ref_img_s": "", "ratio": "",
               "peak_share": ""}
        try:
            results, errors = _concurrent_round(cfg, device, jobs, case, seconds, env)
        except Exception as exc:   # this round's failure, reported in its row; the next round runs
            results, errors = [], [failure_note(exc)]
        modes = sorted({r.get("mode", "?") for r in results} - {"graph"}) if device.type == "cuda" else []
        total = sum(r["images"] / r["seconds"] for r in results)
        row["ours_img_s"] = round(total, 1) if results else ""
        if len(results) < jobs and not errors:
            errors.append(f"{jobs - len(results)} of {jobs} jobs reported nothing")
        row["notes"] = "; ".join(errors + [f"steps ran as {m}" for m in modes])
        if jobs == 1 and results and not errors:
            one_job = (row["ours_img_s"], "")
        if one_job and results and one_job[0]:
            row["vs_one_job"] = round(row["ours_img_s"] / one_job[0], 3)
            if one_job[1]:
                row["notes"] = "; ".join(filter(None, [row["notes"], f"vs 1 job: against {one_job[1]}"]))
        rows.append(row)
        notes = f"  {row['notes']}" if row["notes"] else ""
        log(f"  concurrent x{jobs}: {row['ours_img_s'] or '-'} img/s in total{notes}")
        if on_row:
            on_row(row)
    return rows


def _concurrent_round(cfg: Config, device: torch.device, jobs: int, case: Case, seconds: float, env: dict):
    """N child processes of `case` started together; (their reports, their errors)."""
    with tempfile.TemporaryDirectory(prefix="refilled-conc-") as tmp:
        go = Path(tmp) / "go"
        procs, logs = [], []
        for j in range(jobs):
            spec = {"device": str(device), "case": asdict(case), "config": cfg.name, "seconds": seconds,
                    "ready": str(Path(tmp) / f"ready{j}"), "go": str(go)}
            # files, not pipes: a child must never block on output nobody reads while we wait
            logs.append((open(Path(tmp) / f"out{j}", "w+"), open(Path(tmp) / f"err{j}", "w+")))
            procs.append(subprocess.Popen([sys.executable, "-m", "refilled.tools.bench", "--child", json.dumps(spec)],
                                          env=env, stdout=logs[-1][0], stderr=logs[-1][1], text=True))
        deadline = time.time() + 600
        while not all((Path(tmp) / f"ready{j}").exists() for j in range(jobs)):
            if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
                break
            time.sleep(0.01)
        go.write_text("go")
        results, errors = [], []
        for p, (out_f, err_f) in zip(procs, logs):
            p.wait(timeout=900)
            with out_f, err_f:
                out_f.seek(0)
                err_f.seek(0)
                out, err = out_f.read(), err_f.read()
            if p.returncode == 0:
                results.append(json.loads(out.strip().splitlines()[-1]))
            else:
                errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
    return results, errors
