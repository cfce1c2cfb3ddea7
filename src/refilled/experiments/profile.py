"""Workflow configuration: load a profile from config/, validate it, describe its grid.

Pure Python (no torch): the Snakefile imports this module in the scheduler process.
`params.yaml` holds `profile: <name>`; `config/<name>.yaml` holds every number of that
profile. A profile is checked in two steps, and either stops the run with a message that
names the file and the key:

1. the JSON schema `workflow/schemas/config.schema.yaml` (unknown keys, types, ranges);
2. `check_semantics`: what a schema cannot say (a ratio must give a whole number of
   shared classes, a figure must use a ratio and architecture that exist, ...).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from refilled.data.splits import NUM_CLASSES, classes_needed, shared_classes, valid_ratios
from refilled.models.archs import arch_ok

# Profile keys that set a hyper-parameter of every method declaring it (the grid's values).
GRID_KEYS = ("lam", "k_hat")
EXPERIMENTS = ("table1", "table2", "table3")


class ConfigError(ValueError):
    """A profile that must not run; the message names the file and the key."""


def fmt(x: Any) -> str:
    """A number as it appears in paths and on the command line: 0.5 -> '0.5', 1.0 -> '1', inf -> 'inf'."""
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{float(x):g}" if isinstance(x, float) else str(x)


def load_yaml(path: Path) -> Any:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _where(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def methods_schema() -> dict:
    """The schema of a profile's `methods:` section, derived from the methods' declarations."""
    from refilled.methods import CATALOG

    props = {}
    for name, entry in CATALOG.items():
        hp = {k: {**p.schema(), "description": p.meaning} for k, p in entry.settable.items() if k not in GRID_KEYS}
        props[name] = {"type": "object", "additionalProperties": False, "properties": hp}
    return {"description": "hyper-parameters per method (defaults: each method file's HPARAMS)",
            "type": "object", "additionalProperties": False, "properties": props}


def with_catalog(schema: dict) -> dict:
    """The profile schema with the catalog's parts filled in (method names and hyper-parameters)."""
    from refilled.methods import CATALOG

    schema = dict(schema, properties=dict(schema["properties"], methods=methods_schema()))
    exp = schema["$defs"]["experiment"]
    methods = {"description": "rows of this experiment's table (default: every table method that applies)",
               "type": "array", "items": {"type": "string", "enum": list(CATALOG)}, "minItems": 1,
               "uniqueItems": True}
    schema["$defs"] = dict(schema["$defs"], experiment=dict(exp, properties=dict(exp["properties"], methods=methods)))
    return schema


def method_values(cfg: dict, name: str, **swept) -> dict:
    """Every hyper-parameter of method `name` in profile `cfg`: the declaration's defaults, the
    profile's `methods.<name>` section, the grid keys (lam, k_hat), then `swept` values."""
    from refilled.methods import get

    entry = get(name)
    overrides = dict((cfg.get("methods") or {}).get(name) or {})
    overrides.update({k: cfg[k] for k in GRID_KEYS if k in entry.settable and k in cfg})
    overrides.update(swept)
    return entry.resolve(overrides, where=f"methods.{name}")


def validate_schema(cfg: dict, schema: dict, source: str) -> None:
    """Raise ConfigError naming the key of the first (most relevant) schema violation."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (list(e.absolute_path), e.message))
    if not errors:
        return
    lines = []
    for err in errors[:5]:
        key = _where(err.absolute_path)
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            allowed = ", ".join(sorted(err.schema.get("properties", {})))
            where = "" if not err.absolute_path else f" in {key}"
            lines.append(f"unknown key(s) {', '.join(map(repr, extra))}{where}; allowed: {allowed}")
        else:
            lines.append(f"{key}: {err.message}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    raise ConfigError(f"{source}: invalid configuration: " + "; ".join(lines) + more)


def check_semantics(cfg: dict, source: str) -> None:
    """The checks a JSON schema cannot express. Raises ConfigError listing every problem."""
    problems = []
    exps = cfg["experiments"]
    for name, exp in exps.items():
        n, h = NUM_CLASSES[exp["dataset"]], exp["classes_per_task"]
        if h > n:
            problems.append(f"experiments.{name}.classes_per_task: {h} > {exp['dataset']}'s {n} classes")
            continue
        for i, r in enumerate(exp["ratios"]):
            shared = shared_classes(r, h)
            if shared is None:
                valid = ", ".join(map(fmt, valid_ratios(h))) if h <= 10 else f"multiples of 1/{h}"
                problems.append(f"experiments.{name}.ratios[{i}]: {fmt(r)} does not give a whole number of shared "
                                f"classes with classes_per_task {h}; valid ratios: {valid}")
            elif classes_needed(h, shared) > n:
                problems.append(f"experiments.{name}.ratios[{i}]: {fmt(r)} with classes_per_task {h} needs "
                                f"{classes_needed(h, shared)} classes, {exp['dataset']} has {n} (h <= {n // 2}, or ratio 1)")
        if len(set(exp["ratios"])) != len(exp["ratios"]):
            problems.append(f"experiments.{name}.ratios: duplicate ratios {exp['ratios']}")
        if len(set(exp["students"])) != len(exp["students"]):
            problems.append(f"experiments.{name}.students: duplicate architectures {exp['students']}")
        for i, a in enumerate([exp["teacher"]["arch"], *exp["students"]]):
            if not arch_ok(a):
                key = "teacher.arch" if i == 0 else f"students[{i - 1}]"
                problems.append(f"experiments.{name}.{key}: unknown architecture {a!r} "
                                "(wrn-<depth>-<width> with depth = 6n+4 >= 10, or mobilenet-<width>; the same "
                                "shapes as the authors' code builds them: wrn-authors-<depth>-<width>, "
                                "mobilenet-authors-<width>)")

    def need(key: str, exp_name: str, ratios=(), arch=None):
        exp = exps[exp_name]
        for r in ratios:
            if shared_classes(r, exp["classes_per_task"]) is None:
                problems.append(f"{key}: ratio {fmt(r)} is not valid for experiment {exp_name} "
                                f"(classes_per_task {exp['classes_per_task']})")
        if arch is not None and not arch_ok(arch):
            problems.append(f"{key}: unknown architecture {arch!r}")

    for key in ("test_per_class", "train_per_class"):
        others = sorted({e["dataset"] for e in exps.values()} - {"fashion-mnist"})
        if cfg[key] is not None and others:
            problems.append(f"{key}: subsampling by the data rule is implemented for fashion-mnist only; "
                            f"set it to null for {', '.join(others)}")

    from refilled.methods import CATALOG, ParamError, get

    t4 = cfg["table4"]
    need("table4", t4["experiment"], t4["ratios"], t4["arch"])
    f1, f2, f3 = cfg["figure1"], cfg["figure2"], cfg["figure3"]
    need("figure1", f1["experiment"], [f1["ratio"]], f1["arch"])
    if f1["seed"] not in cfg["seeds"]:
        problems.append(f"figure1.seed: {f1['seed']} is not one of seeds {cfg['seeds']}")
    need("figure2", f2["experiment"], [f2["ratio"]])
    need("figure3", f3["experiment"], f3["ratios"], f3["arch"])
    def method_has(key: str, name: str, needs: str, why: str) -> None:
        entry = CATALOG.get(name)
        if entry is None:
            problems.append(f"{key}.method: unknown method {name!r}; the catalog has: {', '.join(CATALOG)}")
        elif needs == "starts_from" and not entry.starts_from:
            problems.append(f"{key}.method: {name} starts from no other run; {why}")
        elif needs not in ("starts_from",) and needs not in entry.settable:
            problems.append(f"{key}.method: {name} has no hyper-parameter {needs}; {why}")

    method_has("table4", t4["method"], "k_hat", "Table 4 sweeps k_hat")
    if t4["method"] in CATALOG and CATALOG[t4["method"]].scored_by != "ncm_acc":
        problems.append(f"table4.method: {t4['method']} is not scored by NCM accuracy")
    method_has("figure1", f1["method"], "starts_from", "Figure 1 plots a run beside the one it starts from")
    method_has("figure2", f2["method"], "lam", "Figure 2 sweeps lam")
    method_has("figure3", f3["method"], "lam", "Figure 3 plots lambda_i")
    th = cfg["table_h"]
    for name in th["experiments"]:
        need("table_h.ratios", name, th["ratios"] or ())
    for i, a in enumerate(th["students"] or ()):
        if not arch_ok(a):
            problems.append(f"table_h.students[{i}]: unknown architecture {a!r}")
    for m in th["methods"]:
        entry = CATALOG.get(m)
        if entry is None:
            problems.append(f"table_h.methods: unknown method {m!r}; the catalog has: {', '.join(CATALOG)}")
        elif entry.scored_by != "test_acc":
            problems.append(f"table_h.methods: {m} is scored by {entry.scored_by}, it has no head over C to join")
    for name in (cfg.get("methods") or {}):
        try:
            method_values(cfg, name)
        except ParamError as exc:
            problems.append(str(exc))
    for name, exp in exps.items():
        for m in exp.get("methods") or ():
            if get(m).scored_by != "test_acc":
                problems.append(f"experiments.{name}.methods: {m} is scored by {get(m).scored_by}, "
                                "not a row of Tables 1 and 2")
    problems += _check_claims(cfg)
    if len(set(cfg["seeds"])) != len(cfg["seeds"]):
        problems.append(f"seeds: duplicates in {cfg['seeds']}")
    if problems:
        raise ConfigError(f"{source}: invalid configuration: " + "; ".join(problems))


def _check_claims(cfg: dict) -> list[str]:
    from refilled.methods import CATALOG

    problems = []
    claims, gain = cfg.get("claims"), cfg.get("gain_vs_data")
    if claims and not any(math.isclose(claims["auc_ratio"], r) for r in cfg["figure3"]["ratios"]):
        problems.append(f"claims.auc_ratio: {fmt(claims['auc_ratio'])} is not one of figure3.ratios "
                        f"{cfg['figure3']['ratios']} (the runs whose lambda_i AUC claim (c) tests)")
    if gain:
        exp = cfg["experiments"][gain["experiment"]]
        for r in gain["ratios"]:
            if shared_classes(r, exp["classes_per_task"]) is None:
                problems.append(f"gain_vs_data.ratios: {fmt(r)} is not valid for experiment {gain['experiment']}")
        if not arch_ok(gain["arch"]):
            problems.append(f"gain_vs_data.arch: unknown architecture {gain['arch']!r}")
        pool = cfg["train_per_class"]
        for n in gain["per_class"]:
            if pool is not None and n > pool:
                problems.append(f"gain_vs_data.per_class: {n} > train_per_class {pool} (the pool runs draw from)")
        for m in gain["methods"]:
            if m not in CATALOG or CATALOG[m].scored_by != "test_acc":
                problems.append(f"gain_vs_data.methods: {m!r} is not a catalog method scored by test accuracy")
    return problems


def gain_experiment(n: int) -> str:
    return f"gain_n{n}"


def gain_points(cfg: dict) -> dict[int, str]:
    """per_class -> the experiment whose runs are that point of the `gain_vs_data` sweep: the
    base experiment itself where it already trains the point (same per_class and the sweep's
    ratios, student and methods: the same runs, not trained twice), else gain_n<N>."""
    gain = cfg.get("gain_vs_data")
    if not gain:
        return {}
    base = cfg["experiments"][gain["experiment"]]
    covers = (set(map(float, gain["ratios"])) <= set(map(float, base["ratios"])) and gain["arch"] in base["students"]
              and (not base.get("methods") or set(gain["methods"]) <= set(base["methods"])))
    return {n: gain["experiment"] if covers and n == base["per_class"] else gain_experiment(n)
            for n in gain["per_class"]}


def expand_gain_sweep(cfg: dict) -> dict:
    """Each point of `gain_vs_data` that its base experiment does not train (gain_points) as an
    experiment gain_n<N>: the base with per_class N, the sweep's ratios, student and methods, and
    `teacher_of` naming the base whose teacher (and splits) it shares."""
    gain = cfg.get("gain_vs_data")
    if not gain:
        return cfg
    base = cfg["experiments"][gain["experiment"]]
    points = {exp: {**base, "per_class": n, "ratios": list(gain["ratios"]), "students": [gain["arch"]],
                    "methods": list(gain["methods"]), "teacher_of": gain["experiment"]}
              for n, exp in gain_points(cfg).items() if exp != gain["experiment"]}
    return {**cfg, "experiments": {**cfg["experiments"], **points}}


def load_profile(basedir: str | Path, name: str) -> dict:
    """config/<name>.yaml, validated; raises ConfigError."""
    basedir = Path(basedir)
    path = basedir / "config" / f"{name}.yaml"
    known = sorted(p.stem for p in (basedir / "config").glob("*.yaml"))
    if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)) or not path.is_file():
        raise ConfigError(f"profile: unknown profile {name!r}; known profiles: {', '.join(known)} (files in config/)")
    cfg = load_yaml(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    validate_schema(cfg, with_catalog(load_yaml(basedir / "workflow" / "schemas" / "config.schema.yaml")), str(path))
    check_semantics(cfg, str(path))
    return expand_gain_sweep(cfg)


def k_hat_value(x: Any) -> str:
    return "inf" if x in ("inf", None) or (isinstance(x, float) and math.isinf(x)) else str(int(x))
