"""Mean ± std over seeds of every summary.json / ncm JSON under a compare_methods.sh directory."""

import json
import sys
from pathlib import Path

import pandas as pd

root = Path(sys.argv[1])
rows = []
for path in sorted(root.glob("seed*/*/summary.json")):
    s = json.loads(path.read_text())
    metric = "test_acc" if "test_acc" in s else "ncm_acc"   # stage 1 is scored by NCM only
    rows.append({"seed": s["seed"], "run": path.parent.name, "metric": metric, "value": s[metric]})
for path in sorted(root.glob("seed*/ncm_*.json")):
    s = json.loads(path.read_text())
    rows.append({"seed": int(path.parent.name[4:]), "run": path.stem, "metric": "ncm_acc", "value": s["ncm_acc"]})
df = pd.DataFrame(rows)
df["value"] *= 100
table = df.groupby(["run", "metric"])["value"].agg(["mean", "std", "count"]).round(2)
per_seed = df.pivot_table(index="run", columns="seed", values="value").round(2)
print(table.to_string())
print()
print(per_seed.to_string())
